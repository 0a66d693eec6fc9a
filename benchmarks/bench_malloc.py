"""Training step on CPU under three settings of glibc's malloc.

XLA's CPU runtime allocates each step's temporaries afresh. A block over malloc's mmap threshold
is mapped and unmapped on every step, and the kernel zero-fills its pages again each time (page
faults, counted as `sys` CPU time). The trainer compiles its steps with XLA's temporaries in
heaps of at most 16 MiB (`ferret_jax.compiler`), under the threshold; how much memory malloc
then keeps between steps is up to its tunables:

  default  glibc's own (a dynamic mmap threshold; free memory over 2x it is returned to the OS)
  hugetlb  `glibc.malloc.hugetlb=1`: transparent huge pages for malloc's memory (glibc >= 2.35)
  keep     `glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296`: blocks
           up to 32 MiB from the heap, and free memory kept (the Makefile's setting)

The tunables are read at process start, so each setting runs in its own child process (the stage
III `demo` step of `train_step.FerretStep`), alternating between the settings each round. The
last output line is one JSON object with `speedup` (median step time default / keep).

With `--idle S` each timed step follows S seconds asleep, as the interleaved repeats of
`bench_train.py` do; steps over 1.5x the median are counted with their system CPU time.

  python benchmarks/bench_malloc.py [--rounds 3] [--steps 20] [--idle 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

KEEP = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
SETTINGS = {"default": None, "hugetlb": "glibc.malloc.hugetlb=1", "keep": KEEP}


def child(steps: int, idle: float) -> None:
    """Times `steps` demo stage-III steps after 3 untimed ones, each after `idle` seconds asleep;
    prints one JSON line: means per step, and the slow steps (over 1.5x the median) with the
    system CPU time they took."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from train_step import FerretStep, demo_inputs

    step = FerretStep(*demo_inputs())
    for _ in range(3):
        step()
    rows = []
    for _ in range(steps):
        time.sleep(idle)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append((t1 - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
    median = statistics.median(r[0] for r in rows)
    slow = [r for r in rows if r[0] > 1.5 * median]
    print(json.dumps({"step_s": statistics.mean(r[0] for r in rows), "page_faults": statistics.mean(r[1] for r in rows),
                      "user_s": statistics.mean(r[2] for r in rows), "sys_s": statistics.mean(r[3] for r in rows),
                      "slow_steps": len(slow), "slow_sys_s": statistics.mean(r[3] for r in slow) if slow else 0.0}))


def run_child(setting: str | None, steps: int, idle: float) -> dict:
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if setting:
        env["GLIBC_TUNABLES"] = setting
    out = subprocess.run([sys.executable, __file__, "--child", str(steps), "--idle", str(idle)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--idle", type=float, default=0.0, help="seconds asleep before each timed step")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.idle)

    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    thp_mode = open(thp).read().strip() if os.path.exists(thp) else "n/a"
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        for name, setting in SETTINGS.items():
            m = run_child(setting, args.steps, args.idle)
            runs[name].append(m)
            print(f"round {r + 1} {name:8s} {m['step_s'] * 1e3:7.1f} ms/step  {m['page_faults']:8.0f} page faults/step  "
                  f"user {m['user_s'] * 1e3:6.1f} ms  sys {m['sys_s'] * 1e3:6.1f} ms  | {m['slow_steps']} slow steps "
                  f"(sys {m['slow_sys_s'] * 1e3:.0f} ms each)", flush=True)
    med = {k: {f: statistics.median(m[f] for m in v) for f in ("step_s", "page_faults", "user_s", "sys_s", "slow_steps")}
           for k, v in runs.items()}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.libc_ver()[0]} {platform.libc_ver()[1]}, "
                         f"THP {thp_mode}",
              "load_avg_1min_at_start": round(load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
              **{f"{k}_{f}": round(v, 4) for k, m in med.items() for f, v in m.items()},
              "speedup": round(med["default"]["step_s"] / med["keep"]["step_s"], 3),
              "rounds": args.rounds, "steps": args.steps, "idle_s": args.idle}
    print(f"median step: default {med['default']['step_s'] * 1e3:.1f} ms, hugetlb {med['hugetlb']['step_s'] * 1e3:.1f} ms, "
          f"keep {med['keep']['step_s'] * 1e3:.1f} ms (speedup default / keep {result['speedup']:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
