"""Launch `ferret_jax.train` on a SLURM GPU cluster: write an sbatch script and submit it.

    python -m launch.slurm --nodes N --gpus-per-node G [--cpus-per-task C] [--partition P] \\
        [--time HH:MM:SS] [--account A] [--job-name NAME] [--venv PATH] [--chdir DIR] [--script PATH] \\
        [--dry-run] -- --config=configs/stage3.py:size=7b --workdir=/shared/runs/stage3 [--config.key=value ...]

The job runs one JAX process per node (`--ntasks-per-node=1`) that drives all of the node's GPUs,
started by `srun` with `FERRET_DISTRIBUTED=1`, so the trainer calls `jax.distributed.initialize()`,
which finds the coordinator, the process count and the process id in SLURM's environment.

The script goes to `<workdir>/launch.sbatch` (or `--script`), the job's log next to it
(`slurm-<jobid>.out`), and `sbatch` submits it; `--dry-run` prints the script and the `sbatch`
command and writes and runs nothing. The workdir must be on a filesystem every node sees. To resume
after a preemption or a time limit, submit the same script again: the trainer resumes from the
workdir's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence

from launch.common import (
    DISTRIBUTED_ENV,
    LaunchError,
    is_uri,
    require_workdir,
    run_commands,
    split_train_args,
    train_command,
)

TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
# SIGTERM goes to the training processes this many seconds before the time limit, so the trainer
# writes a checkpoint and exits cleanly (SLURM's signal timing has a resolution of about a minute).
TERM_SECONDS_BEFORE_END = 300
# Workdirs under these prefixes are node-local on practically every cluster.
NODE_LOCAL_PREFIXES = ("/tmp", "/dev/shm", "/var/tmp", "/scratch/local")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def slurm_time(text: str) -> str:
    """argparse type: a SLURM time limit, `HH:MM:SS` or `D-HH:MM:SS`."""
    if not TIME_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time limit HH:MM:SS or D-HH:MM:SS (e.g. 24:00:00)")
    return text


def slurm_name(text: str) -> str:
    """argparse type: a partition, account or job name (no spaces or shell characters)."""
    if not SLURM_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SLURM name (letters, digits, '_', '.', ':', '-')")
    return text


def local_device_ids(gpus_per_node: int) -> str:
    """`0,1,...,G-1`: the GPUs the node's one JAX process drives."""
    return ",".join(str(i) for i in range(gpus_per_node))


def default_script_path(workdir: str, chdir: str) -> str:
    """`<workdir>/launch.sbatch`, a relative workdir taken from the job's directory `chdir`."""
    if is_uri(workdir):
        raise LaunchError(f"--workdir={workdir} is not a filesystem path; pass --script PATH for the sbatch script")
    return os.path.normpath(os.path.join(chdir, workdir, "launch.sbatch"))


def node_local_warning(workdir: str) -> str | None:
    """A warning when the workdir is obviously on node-local disk, else None."""
    path = os.path.normpath(workdir)
    if any(path == p or path.startswith(p + "/") for p in NODE_LOCAL_PREFIXES):
        return (
            f"warning: --workdir={workdir} looks node-local; every node must see the same workdir "
            "(use a shared filesystem: NFS, Lustre, GPFS, ...)"
        )
    return None


def sbatch_script(
    *,
    nodes: int,
    gpus_per_node: int,
    cpus_per_task: int,
    train_args: Sequence[str],
    chdir: str,
    log_dir: str,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
    job_name: str = "ferret_jax",
    venv: str | None = None,
) -> str:
    """The text of the sbatch script (validates the numbers and that --workdir is among the train args)."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--cpus-per-task", cpus_per_task)):
        if not isinstance(value, int) or value <= 0:
            raise LaunchError(f"{flag} must be a positive integer, got {value!r}")
    workdir = require_workdir(train_args)
    directives = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus_per_node}",
        f"--cpus-per-task={cpus_per_task}",
        *([f"--partition={partition}"] if partition else []),
        *([f"--time={time}"] if time else []),
        *([f"--account={account}"] if account else []),
        f"--output={os.path.join(log_dir, 'slurm-%j.out')}",
        f"--signal=TERM@{TERM_SECONDS_BEFORE_END}",
    ]
    srun = ["srun", f"--cpus-per-task={cpus_per_task}", "--kill-on-bad-exit=1", *train_command("python", train_args)]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "",
        f"# ferret_jax training on {nodes} node(s) x {gpus_per_node} GPU(s): one JAX process per node drives all",
        "# of its GPUs. Resume after a preemption or a time limit: submit this script again; the trainer",
        "# resumes from the workdir's latest checkpoint.",
        f"# The workdir ({workdir}) must be on a filesystem that every node sees (NFS, Lustre, GPFS, ...):",
        "# all processes write parts of the same checkpoint there.",
        "set -eo pipefail",
        f"cd {shlex.quote(chdir)}",
        *([f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}"] if venv else []),
        "",
        f"# {DISTRIBUTED_ENV}=1: the trainer calls jax.distributed.initialize(), whose SLURM detection reads,",
        "# inside each srun task: SLURM_JOB_ID (coordinator port 61440 + id % 4096, unless JAX_COORDINATOR_PORT),",
        "# SLURM_STEP_NODELIST (its first node is the coordinator), SLURM_NTASKS (process count),",
        "# SLURM_PROCID (process id) and SLURM_LOCALID (which GPU a process gets).",
        f"export {DISTRIBUTED_ENV}=1",
        "# With one task per node SLURM_LOCALID is 0, so JAX would give each process GPU 0 only;",
        "# JAX_LOCAL_DEVICE_IDS hands it all of the node's GPUs instead.",
        f"export JAX_LOCAL_DEVICE_IDS={local_device_ids(gpus_per_node)}",
        "",
        shlex.join(srun),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (the train args after `--` never reach this parser)."""
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Write an sbatch script that runs `python -m ferret_jax.train` on several GPU nodes "
        "(one JAX process per node) and submit it.",
        epilog="Everything after `--` goes to ferret_jax.train unchanged and must include --workdir on a "
        "filesystem all nodes see. Example: python -m launch.slurm --nodes 4 --gpus-per-node 8 --partition gpu "
        "--time 24:00:00 --venv .venv -- --config=configs/stage3.py:size=7b --workdir=/shared/runs/stage3",
    )
    p.add_argument("--nodes", type=positive_int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs per node")
    p.add_argument(
        "--cpus-per-task", type=positive_int, help="CPU cores of each node's process (default: 8 per GPU)"
    )
    p.add_argument("--partition", type=slurm_name, help="SLURM partition")
    p.add_argument("--time", type=slurm_time, help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--account", type=slurm_name, help="SLURM account to charge")
    p.add_argument("--job-name", type=slurm_name, default="ferret_jax", help="job name (default: ferret_jax)")
    p.add_argument("--venv", help="virtual environment the job activates (with ferret_jax and jax[cuda12] installed)")
    p.add_argument("--chdir", default=os.getcwd(), help="directory the job runs in (default: the current one)")
    p.add_argument("--script", help="where to write the sbatch script (default: <workdir>/launch.sbatch)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the script and the sbatch command, write and run nothing"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    launcher_argv, train_args = split_train_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(launcher_argv)
    chdir = os.path.abspath(args.chdir)
    try:
        workdir = require_workdir(train_args)
        script_path = os.path.abspath(args.script) if args.script else default_script_path(workdir, chdir)
        script = sbatch_script(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task or 8 * args.gpus_per_node,
            train_args=train_args,
            chdir=chdir,
            log_dir=os.path.dirname(script_path),
            partition=args.partition,
            time=args.time,
            account=args.account,
            job_name=args.job_name,
            venv=os.path.abspath(args.venv) if args.venv else None,
        )
    except LaunchError as e:
        parser.error(str(e))
    warning = node_local_warning(workdir)
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        print(script, end="")
    else:
        os.makedirs(os.path.dirname(script_path), exist_ok=True)
        with open(script_path, "w") as f:
            f.write(script)
        print(f"wrote {script_path}")
    try:
        run_commands([["sbatch", script_path]], args.dry_run)
    except LaunchError as e:
        print(f"slurm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
