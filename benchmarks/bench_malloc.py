"""Training step on CPU with and without glibc's malloc asking for transparent huge pages.

XLA's CPU runtime allocates each step's buffers afresh. Where Linux runs transparent huge pages
in `madvise` mode, malloc's memory is then faulted in 4 KiB pages on every step, and the kernel
time that costs shows up as `sys` CPU time. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >=
2.35) makes malloc ask for huge pages; the Makefile exports it for `make demo` and `make test`.
The tunable is read at process start, so each setting runs in its own child process (the stage
III `demo` step of `train_step.FerretStep`), alternating between the settings each round. The
last output line is one JSON object with `speedup` (median step time without / with).

  python benchmarks/bench_malloc.py [--rounds 3] [--steps 20]
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

SETTINGS = {"default": None, "hugetlb": "glibc.malloc.hugetlb=1"}


def child(steps: int) -> None:
    """Times `steps` demo stage-III steps after 3 untimed ones; prints one JSON line."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from train_step import FerretStep, demo_inputs

    step = FerretStep(*demo_inputs())
    for _ in range(3):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_s": (t1 - t0) / steps, "page_faults": (r1.ru_minflt - r0.ru_minflt) / steps,
                      "user_s": (r1.ru_utime - r0.ru_utime) / steps, "sys_s": (r1.ru_stime - r0.ru_stime) / steps}))


def run_child(setting: str | None, steps: int) -> dict:
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if setting:
        env["GLIBC_TUNABLES"] = setting
    out = subprocess.run([sys.executable, __file__, "--child", str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    thp_mode = open(thp).read().strip() if os.path.exists(thp) else "n/a"
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        for name, setting in SETTINGS.items():
            m = run_child(setting, args.steps)
            runs[name].append(m)
            print(f"round {r + 1} {name:8s} {m['step_s'] * 1e3:7.1f} ms/step  {m['page_faults']:8.0f} page faults/step  "
                  f"user {m['user_s'] * 1e3:6.1f} ms  sys {m['sys_s'] * 1e3:6.1f} ms", flush=True)
    med = {k: {f: statistics.median(m[f] for m in v) for f in ("step_s", "page_faults", "user_s", "sys_s")}
           for k, v in runs.items()}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.libc_ver()[0]} {platform.libc_ver()[1]}, "
                         f"THP {thp_mode}",
              "load_avg_1min_at_start": round(load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
              **{f"{k}_{f}": round(v, 4) for k, m in med.items() for f, v in m.items()},
              "speedup": round(med["default"]["step_s"] / med["hugetlb"]["step_s"], 3),
              "rounds": args.rounds, "steps": args.steps}
    print(f"median step: default {med['default']['step_s'] * 1e3:.1f} ms, hugetlb {med['hugetlb']['step_s'] * 1e3:.1f} ms "
          f"(speedup {result['speedup']:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
