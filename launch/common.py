"""Pieces shared by the launchers: splitting the command line, finding `--workdir`, printing and running commands.

A launcher's command line is `<launcher options> -- <train args>`; everything after the first `--` is
handed to `python -m ferret_jax.train` unchanged.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

TRAIN_MODULE = "ferret_jax.train"
# The trainer calls `jax.distributed.initialize()` when this variable is set to 1.
DISTRIBUTED_ENV = "FERRET_DISTRIBUTED"


class LaunchError(ValueError):
    """A launcher input that cannot work; the message says what to change."""


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `argv` at the first `--` into (launcher args, train args); no `--` means no train args."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def find_workdir(train_args: Sequence[str]) -> str | None:
    """The value of `--workdir` in the train args (`--workdir=X` or `--workdir X`), or None.

    absl flags also accept a single dash, so `-workdir` counts too; when the flag is given more than
    once the last one wins, as it does in absl.
    """
    workdir = None
    args = list(train_args)
    for i, arg in enumerate(args):
        for flag in ("--workdir", "-workdir"):
            if arg == flag:
                if i + 1 >= len(args) or not args[i + 1]:
                    raise LaunchError(f"{flag} is the last train arg and has no value")
                workdir = args[i + 1]
            elif arg.startswith(flag + "="):
                workdir = arg[len(flag) + 1 :]
                if not workdir:
                    raise LaunchError(f"{arg!r}: the workdir is empty")
    return workdir


def require_workdir(train_args: Sequence[str]) -> str:
    """`find_workdir`, but a missing `--workdir` is an error (the trainer keeps checkpoints there)."""
    workdir = find_workdir(train_args)
    if workdir is None:
        raise LaunchError(
            "the train args (after `--`) need --workdir=DIR: checkpoints, logs and resumption live there; "
            f"got train args: {shlex.join(train_args) or '(none)'}"
        )
    return workdir


def is_uri(path: str) -> bool:
    """True for object-store URIs such as `gs://bucket/run` (as opposed to filesystem paths)."""
    return "://" in path


def train_command(python: str, train_args: Sequence[str]) -> list[str]:
    """The argv that starts the trainer with `python`."""
    return [python, "-m", TRAIN_MODULE, *train_args]


def format_command(argv: Sequence[str]) -> str:
    """One printed line per command: `+ ` then the shell-quoted argv (as `set -x` shows it)."""
    return "+ " + shlex.join(argv)


def run_commands(
    commands: Sequence[Sequence[str]],
    dry_run: bool,
    echo: Callable[[str], None] = print,
    runner: Callable[..., object] = subprocess.run,
) -> None:
    """Prints each command; unless `dry_run`, runs it too (output streams through), stopping at a failure.

    Raises `LaunchError` naming the failed command; a missing program (e.g. gcloud not installed) is
    reported the same way.
    """
    for argv in commands:
        echo(format_command(argv))
        if dry_run:
            continue
        sys.stdout.flush()
        try:
            runner(list(argv), check=True)
        except FileNotFoundError as e:
            raise LaunchError(f"{argv[0]!r} is not installed or not on PATH ({e})") from e
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"command failed with exit status {e.returncode}: {shlex.join(argv)}") from e
