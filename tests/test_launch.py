"""The TPU pod and SLURM launchers: printed commands, validation, and that a dry run executes nothing."""

import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from launch import common, slurm, tpu_pod

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--config=configs/stage3.py:size=7b", "--workdir=gs://b/run", "--config.run_name=my run"]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
ZONE = ["--zone", "us-west4-a"]
PROJECT = ["--project", "my-proj"]


def pinned_jax() -> str:
    """The jax pin of requirements.txt, read independently of the launcher."""
    return re.search(r"^jax==(\S+)\s*$", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(1)


def launch(module, *args, env=None, cwd=REPO_ROOT):
    """Runs `python -m launch.<module> ARGS` from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", f"launch.{module}", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )


def env_with(tmp_path, path=None, **extra):
    """The current environment with TMPDIR in tmp_path (where the TPU tarball would go) and PATH replaced."""
    env = {**os.environ, "TMPDIR": str(tmp_path), **extra}
    if path is not None:
        env["PATH"] = path
    return env


def commands(stdout):
    """The printed `+ ` lines, each split back into its argv."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def fake_program(bin_dir: Path, name: str, log: Path, exit_code: int = 0) -> None:
    """An executable that appends its argv (fields separated by \\x1f) as one line to `log`."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nprintf '%s\\037' {name} \"$@\" >> '{log}'\nprintf '\\n' >> '{log}'\nexit {exit_code}\n")
    script.chmod(0o755)


def logged_calls(log: Path):
    return [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- TPU pod


TPU_ARGS = ["--name", "ferret", "--zone", "us-west4-a", "--accelerator", "v5litepod-64", "--project", "my-proj"]


def test_tpu_dry_run_prints_the_exact_commands_and_runs_nothing(tmp_path):
    # PATH holds neither gcloud nor tar: a command that really ran would fail.
    res = launch("tpu_pod", *TPU_ARGS, "--spot", "--copy-dir", ".", "--dry-run", "--", *TRAIN,
                 env=env_with(tmp_path, path="/nonexistent"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "# hosts: 16 (v5litepod-64)"
    assert all(line.startswith("+ ") for line in lines[1:]) and len(lines) == 7
    tarball = os.path.join(str(tmp_path), "ferret_jax-ferret.tar.gz")
    install = (
        "if [ ! -x ferret_venv/bin/python ]; then (command -v python3.11 >/dev/null || (sudo apt-get update -q && "
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q python3.11 python3.11-venv)) && "
        "python3.11 -m venv ferret_venv; fi && cd ferret_jax && "
        "../ferret_venv/bin/python -m pip install --upgrade pip && "
        "../ferret_venv/bin/python -m pip install -r requirements.txt && "
        "../ferret_venv/bin/python -m pip install -e . && "
        f"../ferret_venv/bin/python -m pip install 'jax[tpu]=={pinned_jax()}' gcsfs "
        "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    )
    train = "cd ferret_jax && FERRET_DISTRIBUTED=1 ../ferret_venv/bin/python -m ferret_jax.train " + shlex.join(TRAIN)
    ssh = [*GCLOUD_TPU, "ssh", "ferret", *ZONE, "--worker=all", "--command"]
    create = [*GCLOUD_TPU, "create", "ferret", *ZONE, "--accelerator-type", "v5litepod-64",
              "--version", "v2-alpha-tpuv5-lite", "--spot", *PROJECT]
    expected = {
        1: create,
        3: [*GCLOUD_TPU, "scp", tarball, "ferret:ferret_jax.tar.gz", *ZONE, "--worker=all", *PROJECT],
        4: [*ssh, "rm -rf ferret_jax && mkdir ferret_jax && tar -xzf ferret_jax.tar.gz -C ferret_jax", *PROJECT],
        5: [*ssh, install, *PROJECT],
        6: [*ssh, train, *PROJECT],
    }
    for i, argv in expected.items():
        assert lines[i] == "+ " + shlex.join(argv)
    tar = shlex.split(lines[2][2:])
    assert tar[:3] == ["tar", "-czf", tarball] and tar[-3:] == ["-C", ".", "."]
    assert {"--exclude=.git", "--exclude=.venv"} <= set(tar)
    # The train args survive both quoting layers intact, the one with a space included.
    assert shlex.split(commands(res.stdout)[-1][-3])[-3:] == TRAIN
    assert not os.path.exists(tarball)


def test_tpu_reuse_describes_instead_of_creating_and_clone_ships_the_code(tmp_path):
    res = launch("tpu_pod", *TPU_ARGS, "--reuse", "--repo-url", "https://example.com/ferret_jax.git",
                 "--branch", "v1", "--dry-run", "--", *TRAIN, env=env_with(tmp_path, path="/nonexistent"))
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    assert cmds[0] == [*GCLOUD_TPU, "describe", "ferret", *ZONE, *PROJECT]
    assert not any("create" in c for c in cmds)
    assert cmds[1] == [*GCLOUD_TPU, "ssh", "ferret", *ZONE, "--worker=all", "--command",
                       "rm -rf ferret_jax && git clone --depth 1 --branch v1 https://example.com/ferret_jax.git ferret_jax",
                       *PROJECT]
    assert len(cmds) == 4 and "FERRET_DISTRIBUTED=1" in cmds[3][-3]


@pytest.mark.parametrize(
    "workdir_args, accelerator",
    [(["--workdir=/tmp/run"], "v5litepod-64"), (["--workdir", "ckpt"], "v4-32"), (["--workdir=/tmp/run"], "v6e-16")],
)
def test_tpu_local_workdir_on_a_multi_host_slice_is_rejected(tmp_path, workdir_args, accelerator):
    res = launch("tpu_pod", "--name", "ferret", "--zone", "us-west4-a", "--accelerator", accelerator,
                 "--dry-run", "--", "--config=configs/stage1.py", *workdir_args, env=env_with(tmp_path))
    assert res.returncode != 0 and res.stdout == ""
    assert "is not a gs:// path" in res.stderr and "every host must see the same checkpoint directory" in res.stderr


def test_tpu_single_host_accepts_a_local_workdir_and_unknown_sizes_say_so(tmp_path):
    res = launch("tpu_pod", "--name", "ferret", "--zone", "us-west4-a", "--accelerator", "v5litepod-8",
                 "--dry-run", "--", "--workdir=/home/me/run", env=env_with(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "# hosts: 1 (v5litepod-8)"
    # By default the launcher ships the repository it lives in.
    tar = commands(res.stdout)[1]
    assert tar[-3:] == ["-C", str(REPO_ROOT), "."]
    res = launch("tpu_pod", "--name", "ferret", "--zone", "us-west4-a", "--accelerator", "v6e-16",
                 "--dry-run", "--", "--workdir=gs://b/run", env=env_with(tmp_path))
    assert res.returncode == 0 and res.stdout.splitlines()[0] == "# hosts: see gcloud describe"
    assert "v2-alpha-tpuv6e" in commands(res.stdout)[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator", "v5e"], "is not a TPU accelerator type"),
        (["--accelerator", "v4-32", "--zone", "west"], "is not a zone name"),
        (["--accelerator", "v4-32", "--name", "Ferret_1"], "is not a valid TPU name"),
        (["--accelerator", "v4-32", "--copy-dir", "/nonexistent"], "has no requirements.txt"),
        (["--accelerator", "v4-32", "--branch", "main"], "--branch needs --repo-url"),
        (["--accelerator", "v4-32", "--repo-url", "u", "--copy-dir", "."], "not allowed with argument"),
    ],
)
def test_tpu_bad_inputs_are_rejected(tmp_path, args, message):
    base = {"--name": "ferret", "--zone": "us-west4-a"}
    for flag in list(base):
        if flag in args:
            del base[flag]
    flat = [x for kv in base.items() for x in kv]
    res = launch("tpu_pod", *flat, *args, "--dry-run", "--", "--workdir=gs://b/r", env=env_with(tmp_path))
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_tpu_missing_workdir_is_rejected(tmp_path):
    res = launch("tpu_pod", *TPU_ARGS, "--dry-run", "--", "--config=configs/stage3.py", env=env_with(tmp_path))
    assert res.returncode == 2 and "need --workdir" in res.stderr


def _copy_dir(tmp_path):
    src = tmp_path / "src"
    (src / ".git").mkdir(parents=True)
    (src / ".git" / "HEAD").write_text("ref\n")
    (src / "requirements.txt").write_text("jax==9.9.9\njaxlib==9.9.9\n")
    (src / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return src


def test_tpu_without_dry_run_runs_each_command_in_order(tmp_path):
    log = tmp_path / "calls.log"
    fake_program(tmp_path / "bin", "gcloud", log)
    src = _copy_dir(tmp_path)
    env = env_with(tmp_path, path=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    res = launch("tpu_pod", *TPU_ARGS, "--copy-dir", str(src), "--", *TRAIN, env=env)
    assert res.returncode == 0, res.stderr
    calls = logged_calls(log)
    assert [c[:5] for c in calls] == [["gcloud", *GCLOUD_TPU[1:], verb] for verb in ("create", "scp", "ssh", "ssh", "ssh")]
    printed = commands(res.stdout)
    assert calls == [c for c in printed if c[0] == "gcloud"]
    assert "'jax[tpu]==9.9.9'" in calls[3][-3]  # the pin comes from the shipped tree's requirements.txt
    with tarfile.open(tmp_path / "ferret_jax-ferret.tar.gz") as tar:
        names = tar.getnames()
    assert "./requirements.txt" in names and not any(".git" in n for n in names)


def test_tpu_failed_command_stops_the_launch_with_a_hint(tmp_path):
    log = tmp_path / "calls.log"
    fake_program(tmp_path / "bin", "gcloud", log, exit_code=3)
    env = env_with(tmp_path, path=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    res = launch("tpu_pod", *TPU_ARGS, "--reuse", "--repo-url", "u", "--", *TRAIN, env=env)
    assert res.returncode == 1 and len(logged_calls(log)) == 1
    assert "command failed with exit status 3" in res.stderr and "--reuse" in res.stderr


# ------------------------------------------------------------------------------------------------ SLURM


SLURM_TRAIN = ["--config=configs/stage3.py:size=7b", "--config.note=a b"]


def test_slurm_dry_run_prints_the_script_and_the_sbatch_command(tmp_path):
    workdir = tmp_path / "run"
    res = launch("slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1-12:00:00",
                 "--account", "proj", "--venv", ".venv", "--dry-run", "--", *SLURM_TRAIN, f"--workdir={workdir}",
                 env=env_with(tmp_path, path="/nonexistent"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH ")]
    assert lines[0] == "#!/bin/bash" and lines[1 : 1 + len(directives)] == directives  # directives come first
    assert directives == [
        "#SBATCH --job-name=ferret_jax",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1-12:00:00",
        "#SBATCH --account=proj",
        f"#SBATCH --output={workdir}/slurm-%j.out",
        "#SBATCH --signal=TERM@300",
    ]
    assert f"cd {REPO_ROOT}" in lines and f"source {REPO_ROOT}/.venv/bin/activate" in lines
    assert "export FERRET_DISTRIBUTED=1" in lines and "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    srun = ("srun --cpus-per-task=32 --kill-on-bad-exit=1 python -m ferret_jax.train "
            f"--config=configs/stage3.py:size=7b '--config.note=a b' --workdir={workdir}")
    assert lines[-2] == srun
    assert lines[-1] == f"+ sbatch {workdir}/launch.sbatch"
    assert "filesystem that every node sees" in res.stdout
    script = "\n".join(lines[:-1]) + "\n"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "0", "--gpus-per-node", "8"], "0 must be > 0"),
        (["--nodes", "2", "--gpus-per-node", "-1"], "-1 must be > 0"),
        (["--nodes", "two", "--gpus-per-node", "8"], "'two' is not an integer"),
        (["--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "0"], "0 must be > 0"),
        (["--nodes", "2", "--gpus-per-node", "8", "--time", "12:75:00"], "is not a time limit"),
        (["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu; rm"], "is not a SLURM name"),
    ],
)
def test_slurm_bad_numbers_are_rejected(args, message):
    res = launch("slurm", *args, "--dry-run", "--", "--workdir=runs/x")
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_slurm_needs_a_workdir_and_a_script_path_for_uri_workdirs():
    res = launch("slurm", "--nodes", "1", "--gpus-per-node", "8", "--dry-run", "--", "--config=configs/stage1.py")
    assert res.returncode == 2 and "need --workdir" in res.stderr
    res = launch("slurm", "--nodes", "1", "--gpus-per-node", "8", "--dry-run", "--", "--workdir=gs://b/r")
    assert res.returncode == 2 and "pass --script" in res.stderr


def test_slurm_relative_workdir_resolves_against_the_job_directory_and_tmp_warns():
    res = launch("slurm", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", "--", "--workdir", "runs/x")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.splitlines()[-1] == f"+ sbatch {REPO_ROOT}/runs/x/launch.sbatch"
    res = launch("slurm", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", "--", "--workdir=/tmp/x")
    assert res.returncode == 0 and "looks node-local" in res.stderr


def test_slurm_without_dry_run_writes_the_script_and_submits_it(tmp_path):
    log = tmp_path / "calls.log"
    fake_program(tmp_path / "bin", "sbatch", log)
    workdir = tmp_path / "run"
    args = ["--nodes", "3", "--gpus-per-node", "8", "--", *SLURM_TRAIN, f"--workdir={workdir}"]
    dry = launch("slurm", "--dry-run", *args)
    res = launch("slurm", *args, env=env_with(tmp_path, path=f"{tmp_path / 'bin'}:{os.environ['PATH']}"))
    assert res.returncode == 0, res.stderr
    script_path = workdir / "launch.sbatch"
    assert logged_calls(log) == [["sbatch", str(script_path)]]
    assert script_path.read_text() == "\n".join(dry.stdout.splitlines()[:-1]) + "\n"


def test_slurm_script_env_gives_one_process_all_gpus_of_its_node(tmp_path):
    """What jax.distributed.initialize() does with the script's env inside a (simulated) one-task srun step.

    Without JAX_LOCAL_DEVICE_IDS, JAX's SLURM detection would restrict the node's process to GPU 0.
    """
    script = slurm.sbatch_script(nodes=1, gpus_per_node=4, cpus_per_task=8, train_args=["--workdir=w"],
                                 chdir="/", log_dir="/")
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", script, re.M))
    assert exports == {"FERRET_DISTRIBUTED": "1", "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    step = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(port),
            "JAX_PLATFORMS": "cpu"}
    probe = ("import jax; jax.distributed.initialize(); "
             "print(jax.process_count(), jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()")
    base = {k: v for k, v in os.environ.items() if k != "JAX_LOCAL_DEVICE_IDS"}

    def visible(env):
        res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert visible({**base, **step, **exports}) == ["1", "0,1,2,3"]
    assert visible({**base, **step}) == ["1", "0"]


# ------------------------------------------------------------------------------------------ pure functions


def test_find_workdir_forms():
    assert common.find_workdir(["--workdir=gs://a"]) == "gs://a"
    assert common.find_workdir(["--config=x", "--workdir", "/b"]) == "/b"
    assert common.find_workdir(["-workdir=c"]) == "c"
    assert common.find_workdir(["--workdir=a", "--workdir", "b"]) == "b"  # the last wins, as in absl
    assert common.find_workdir(["--workdirs=a", "--config.workdir=b"]) is None
    with pytest.raises(common.LaunchError, match="has no value"):
        common.find_workdir(["--workdir"])
    assert common.split_train_args(["--a", "--", "--b", "--", "c"]) == (["--a"], ["--b", "--", "c"])
    assert common.format_command(["x", "a b"]) == "+ x 'a b'"


@pytest.mark.parametrize(
    "accelerator, hosts",
    [("v5litepod-64", 16), ("v5litepod-16", 4), ("v5litepod-8", 1), ("v5litepod-4", 1), ("v4-8", 1),
     ("v4-32", 4), ("v5p-128", 16), ("v3-32", 4), ("v2-8", 1), ("v6e-16", None), ("v4-12", None)],
)
def test_host_count(accelerator, hosts):
    assert tpu_pod.host_count(accelerator) == hosts


@pytest.mark.parametrize("accelerator", ["v5e", "tpu-64", "v4-0", "V4-8", "v5litepod-64 "])
def test_bad_accelerators(accelerator):
    with pytest.raises(common.LaunchError, match="not a TPU accelerator type"):
        tpu_pod.parse_accelerator(accelerator)


def test_read_pinned_version_and_build_commands():
    assert tpu_pod.read_pinned_version("# pins\njaxlib==1.0\njax==2.0  # note\n") == "2.0"
    assert tpu_pod.read_pinned_version("jax[cpu]==3.1\n") == "3.1"
    assert tpu_pod.read_pinned_version((REPO_ROOT / "requirements.txt").read_text()) == pinned_jax()
    with pytest.raises(common.LaunchError, match="pins no exact version of jax"):
        tpu_pod.read_pinned_version("jax>=0.4\njaxlib==1\n")
    kw = dict(name="t", zone="us-central2-b", accelerator="v4-8", train_args=["--workdir=/w"], jax_version="1")
    with pytest.raises(common.LaunchError, match="exactly one of"):
        tpu_pod.build_commands(**kw)
    cmds = tpu_pod.build_commands(**kw, repo_url="u")
    assert cmds[0] == [*GCLOUD_TPU, "create", "t", "--zone", "us-central2-b", "--accelerator-type", "v4-8",
                       "--version", "tpu-ubuntu2204-base"]
    assert cmds[-1][-1] == "cd ferret_jax && FERRET_DISTRIBUTED=1 ../ferret_venv/bin/python -m ferret_jax.train --workdir=/w"


def test_sbatch_script_validates_directly():
    with pytest.raises(common.LaunchError, match="--nodes must be a positive integer"):
        slurm.sbatch_script(nodes=0, gpus_per_node=1, cpus_per_task=1, train_args=["--workdir=w"], chdir="/", log_dir="/")
    with pytest.raises(common.LaunchError, match="need --workdir"):
        slurm.sbatch_script(nodes=1, gpus_per_node=1, cpus_per_task=1, train_args=[], chdir="/", log_dir="/")
    assert slurm.node_local_warning("/tmpfoo/x") is None and slurm.node_local_warning("/dev/shm/x")
