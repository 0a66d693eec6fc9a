"""Launch `ferret_jax.train` on a Cloud TPU VM or pod slice with gcloud.

    python -m launch.tpu_pod --name NAME --zone ZONE --accelerator v5litepod-64 \\
        [--version RUNTIME] [--project P] [--spot] [--reuse] \\
        [--repo-url URL [--branch B] | --copy-dir DIR] [--python python3.11] [--dry-run] \\
        -- --config=configs/stage3.py:size=7b --workdir=gs://BUCKET/run [--config.key=value ...]

The launcher runs these commands in order (`--dry-run` prints them, one per line after `+ `, and runs
nothing):

1. `gcloud compute tpus tpu-vm create` the TPU VM (with `--reuse`: `describe` an existing one instead);
2. ship the code to every worker: a tarball of `--copy-dir` through `tpu-vm scp --worker=all`, or a
   `git clone` of `--repo-url` through `tpu-vm ssh --worker=all`;
3. install on every worker: a venv (`~/ferret_venv`), `requirements.txt`, the project itself, then
   `jax[tpu]` at the version `requirements.txt` pins (plus `gcsfs`, which gs:// checkpoints need
   when TensorFlow is absent);
4. start the same training command on every worker with `FERRET_DISTRIBUTED=1`, so the trainer calls
   `jax.distributed.initialize()`; on Cloud TPU it needs no arguments (JAX reads the slice's topology
   from the TPU metadata server).

Every host of a multi-host slice must write to the same checkpoint directory, so there `--workdir`
must be a `gs://` path. To resume after a preemption, rerun the same command (delete a preempted
spot VM first, or pass `--reuse` when the VM is still up): the trainer resumes from the workdir's
latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from launch.common import (
    DISTRIBUTED_ENV,
    LaunchError,
    require_workdir,
    run_commands,
    split_train_args,
    train_command,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Names on the workers, relative to the ssh login directory (the home directory).
REMOTE_DIR = "ferret_jax"
REMOTE_VENV = "ferret_venv"
REMOTE_TARBALL = "ferret_jax.tar.gz"
# The venv's interpreter as seen from inside REMOTE_DIR (a relative path needs no shell expansion).
REMOTE_PYTHON = f"../{REMOTE_VENV}/bin/python"
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# What the tarball of --copy-dir leaves out: VCS data, local environments, caches and local run dirs.
TARBALL_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "build", "workdir*", "demo_out")

ACCELERATOR_RE = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
TPU_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
# Accelerator families whose size counts TensorCores, 8 to a host (v2/v3: 4 chips x 2 cores;
# v4/v5p: 4 chips x 2 cores, counted as cores in the type name).
_CORE_COUNTED = ("v2", "v3", "v4", "v5p")
# Default TPU VM runtime image per accelerator family; the rest use tpu-ubuntu2204-base.
_RUNTIME_VERSIONS = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"


def parse_accelerator(accelerator: str) -> tuple[str, int]:
    """Splits an accelerator type such as `v5litepod-64` into (family, size): ("v5litepod", 64)."""
    m = ACCELERATOR_RE.match(accelerator)
    if not m or int(m.group(2)) <= 0:
        raise LaunchError(
            f"--accelerator {accelerator!r} is not a TPU accelerator type; expected e.g. v4-32, v5p-128, "
            "v5litepod-64, v6e-16 (pattern v<generation>[variant]-<size>)"
        )
    return m.group(1), int(m.group(2))


def host_count(accelerator: str) -> int | None:
    """Number of TPU VM hosts of a slice, where it is certain; None for the rest.

    v2/v3/v4/v5p sizes count TensorCores, 8 to a host (v4-32: 4 hosts); v5litepod sizes count chips:
    1, 4 and 8 chips are one host, larger slices have 4 chips a host (v5litepod-64: 16 hosts).
    """
    family, size = parse_accelerator(accelerator)
    if family in _CORE_COUNTED:
        return size // 8 if size % 8 == 0 else None
    if family == "v5litepod":
        if size in (1, 4, 8):
            return 1
        return size // 4 if size % 4 == 0 else None
    return None


def default_runtime_version(accelerator: str) -> str:
    """The TPU VM image Cloud TPU documents for the accelerator family."""
    family, _ = parse_accelerator(accelerator)
    return _RUNTIME_VERSIONS.get(family, DEFAULT_RUNTIME)


def read_pinned_version(requirements_text: str, package: str = "jax") -> str:
    """The exact version `package==X` pins in a requirements file's text."""
    pattern = re.compile(rf"^\s*{re.escape(package)}\s*(\[[^\]]*\])?\s*==\s*([^\s;#]+)", re.IGNORECASE)
    for line in requirements_text.splitlines():
        m = pattern.match(line.split("#", 1)[0])
        if m:
            return m.group(2)
    raise LaunchError(f"requirements.txt pins no exact version of {package} (expected a line `{package}==X`)")


def validate_target(name: str, zone: str) -> None:
    """TPU names follow GCE resource naming; zones look like us-west4-a."""
    if not TPU_NAME_RE.match(name):
        raise LaunchError(
            f"--name {name!r} is not a valid TPU name: lowercase letters, digits and '-', starting with a letter, "
            "at most 63 characters"
        )
    if not ZONE_RE.match(zone):
        raise LaunchError(f"--zone {zone!r} is not a zone name such as us-west4-a or europe-west4-b")


def validate_workdir(workdir: str, hosts: int | None, accelerator: str) -> None:
    """A multi-host slice (or one whose host count is unknown) needs a gs:// workdir all hosts share."""
    if hosts == 1 or workdir.startswith("gs://"):
        return
    how_many = f"{hosts} hosts" if hosts else "possibly several hosts"
    raise LaunchError(
        f"--workdir={workdir} is not a gs:// path, but {accelerator} has {how_many}: every host must see the same "
        "checkpoint directory (each host's local disk would hold only its own part of the checkpoint); "
        "use --workdir=gs://BUCKET/PATH"
    )


def gcloud_tpu(verb: str, *positional: str, zone: str, project: str | None, extra: Sequence[str] = ()) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB POSITIONAL... --zone Z [EXTRA...] [--project P]`."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, "--zone", zone, *extra]
    if project:
        argv += ["--project", project]
    return argv


def on_all_workers(name: str, zone: str, project: str | None, remote_command: str) -> list[str]:
    """Runs a shell command on every worker of the slice at once."""
    return gcloud_tpu("ssh", name, zone=zone, project=project, extra=["--worker=all", "--command", remote_command])


def create_command(name: str, zone: str, project: str | None, accelerator: str, version: str, spot: bool) -> list[str]:
    """Creates the TPU VM (slice)."""
    extra = ["--accelerator-type", accelerator, "--version", version] + (["--spot"] if spot else [])
    return gcloud_tpu("create", name, zone=zone, project=project, extra=extra)


def describe_command(name: str, zone: str, project: str | None) -> list[str]:
    """Fails when the TPU VM does not exist (used with --reuse)."""
    return gcloud_tpu("describe", name, zone=zone, project=project)


def tarball_path(name: str) -> str:
    """Where the local tarball of --copy-dir is written."""
    return os.path.join(tempfile.gettempdir(), f"ferret_jax-{name}.tar.gz")


def copy_commands(copy_dir: str, name: str, zone: str, project: str | None) -> list[list[str]]:
    """Tar the local tree, scp it to every worker, unpack it into a fresh REMOTE_DIR."""
    tarball = tarball_path(name)
    tar = ["tar", "-czf", tarball, *(f"--exclude={p}" for p in TARBALL_EXCLUDES), "-C", copy_dir, "."]
    scp = gcloud_tpu("scp", tarball, f"{name}:{REMOTE_TARBALL}", zone=zone, project=project, extra=["--worker=all"])
    unpack = f"rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}"
    return [tar, scp, on_all_workers(name, zone, project, unpack)]


def clone_command(repo_url: str, branch: str | None, name: str, zone: str, project: str | None) -> list[str]:
    """A fresh shallow clone of the repository on every worker."""
    clone = ["git", "clone", "--depth", "1", *(["--branch", branch] if branch else []), repo_url, REMOTE_DIR]
    return on_all_workers(name, zone, project, f"rm -rf {REMOTE_DIR} && {shlex.join(clone)}")


def install_script(python: str, jax_version: str) -> str:
    """The shell command that installs the project on a worker (idempotent: the venv outlives REMOTE_DIR).

    Cloud TPU images ship an older system Python than the project needs, so a missing `python` is
    installed with apt (`python` and `python-venv`, e.g. python3.11 and python3.11-venv).
    """
    py = shlex.quote(python)
    make_venv = (
        f"if [ ! -x {REMOTE_VENV}/bin/python ]; then "
        f"(command -v {py} >/dev/null || (sudo apt-get update -q && "
        f"sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q {py} {shlex.quote(python + '-venv')})) && "
        f"{py} -m venv {REMOTE_VENV}; fi"
    )
    pip = f"{REMOTE_PYTHON} -m pip install"
    steps = [
        make_venv,
        f"cd {REMOTE_DIR}",
        f"{pip} --upgrade pip",
        f"{pip} -r requirements.txt",
        f"{pip} -e .",
        f"{pip} {shlex.quote(f'jax[tpu]=={jax_version}')} gcsfs -f {LIBTPU_FIND_LINKS}",
    ]
    return " && ".join(steps)


def train_script(train_args: Sequence[str]) -> str:
    """The shell command that starts training on a worker, the train args shell-quoted intact."""
    return f"cd {REMOTE_DIR} && {DISTRIBUTED_ENV}=1 {shlex.join(train_command(REMOTE_PYTHON, train_args))}"


def build_commands(
    *,
    name: str,
    zone: str,
    accelerator: str,
    train_args: Sequence[str],
    jax_version: str,
    version: str | None = None,
    project: str | None = None,
    spot: bool = False,
    reuse: bool = False,
    repo_url: str | None = None,
    branch: str | None = None,
    copy_dir: str | None = None,
    python: str = "python3.11",
) -> list[list[str]]:
    """All commands of a launch, in order, after validating the inputs (raises LaunchError)."""
    validate_target(name, zone)
    hosts = host_count(accelerator)
    validate_workdir(require_workdir(train_args), hosts, accelerator)
    if (repo_url is None) == (copy_dir is None):
        raise LaunchError("give exactly one of --repo-url and --copy-dir")
    commands = [
        describe_command(name, zone, project)
        if reuse
        else create_command(name, zone, project, accelerator, version or default_runtime_version(accelerator), spot)
    ]
    if copy_dir is not None:
        commands += copy_commands(copy_dir, name, zone, project)
    else:
        commands.append(clone_command(repo_url, branch, name, zone, project))
    commands.append(on_all_workers(name, zone, project, install_script(python, jax_version)))
    commands.append(on_all_workers(name, zone, project, train_script(train_args)))
    return commands


def hosts_note(accelerator: str) -> str:
    """The printed line about the slice's host count."""
    hosts = host_count(accelerator)
    return f"# hosts: {hosts} ({accelerator})" if hosts else "# hosts: see gcloud describe"


def check_copy_dir(copy_dir: str) -> str:
    """The --copy-dir must be a ferret_jax checkout; returns its requirements.txt text."""
    root = Path(copy_dir)
    for needed in ("requirements.txt", "pyproject.toml"):
        if not (root / needed).is_file():
            raise LaunchError(f"--copy-dir {copy_dir!r} has no {needed}: pass the root of the ferret_jax repository")
    return (root / "requirements.txt").read_text()


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (the train args after `--` never reach this parser)."""
    p = argparse.ArgumentParser(
        prog="python -m launch.tpu_pod",
        description="Create (or reuse) a Cloud TPU VM slice, ship and install ferret_jax on every worker, "
        "and run the same `python -m ferret_jax.train` on all of them.",
        epilog="Everything after `--` goes to ferret_jax.train unchanged and must include --workdir "
        "(a gs:// path on multi-host slices). Example: python -m launch.tpu_pod --name ferret --zone us-west4-a "
        "--accelerator v5litepod-64 --spot -- --config=configs/stage3.py:size=7b --workdir=gs://my-bucket/stage3",
    )
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="GCP zone, e.g. us-west4-a")
    p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v4-32, v5p-128, v5litepod-64")
    p.add_argument(
        "--version",
        help="TPU VM runtime image (default: v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p, "
        "v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)",
    )
    p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    p.add_argument("--spot", action="store_true", help="create a spot (preemptible) TPU VM")
    p.add_argument(
        "--reuse", action="store_true", help="use an existing TPU VM (checked with describe) instead of creating one"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--repo-url", help="git URL the workers clone the code from")
    src.add_argument("--copy-dir", help=f"local repository root to copy to the workers (default: {REPO_ROOT})")
    p.add_argument("--branch", help="branch or tag to clone (with --repo-url)")
    p.add_argument("--python", default="python3.11", help="Python the workers' venv is built on (default: python3.11)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    launcher_argv, train_args = split_train_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(launcher_argv)
    if args.branch and not args.repo_url:
        parser.error("--branch needs --repo-url")
    copy_dir = None if args.repo_url else (args.copy_dir or str(REPO_ROOT))
    try:
        requirements = check_copy_dir(copy_dir) if copy_dir else (REPO_ROOT / "requirements.txt").read_text()
        commands = build_commands(
            name=args.name,
            zone=args.zone,
            accelerator=args.accelerator,
            train_args=train_args,
            jax_version=read_pinned_version(requirements, "jax"),
            version=args.version,
            project=args.project,
            spot=args.spot,
            reuse=args.reuse,
            repo_url=args.repo_url,
            branch=args.branch,
            copy_dir=copy_dir,
            python=args.python,
        )
    except LaunchError as e:
        parser.error(str(e))
    print(hosts_note(args.accelerator))
    try:
        run_commands(commands, args.dry_run)
    except LaunchError as e:
        delete = gcloud_tpu("delete", args.name, zone=args.zone, project=args.project)
        print(
            f"tpu_pod: error: {e}\nIf the TPU VM was preempted, delete it ({shlex.join(delete)}) and rerun "
            "this command; with the VM still up, rerun it with --reuse. Training resumes from the workdir's latest "
            "checkpoint.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
