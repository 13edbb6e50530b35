"""`fewstep launch`: `accelerate launch` with fewstep's guard around it.

It takes exactly `accelerate launch`'s options and script (`fewstep launch --multi_gpu --num_processes 8
scripts/distill.py recipe=dmd2 model=sdxl`) and runs accelerate's own launcher (simple, torchrun, DeepSpeed),
adding two things: a `scripts/distill.py` run is validated here first (config, teacher, data, output folder),
so bad input is reported before any process starts; and a failing child's exit code is passed on as it is (2 for
bad input, after the child's one `error:` line) instead of accelerate's traceback and exit code 1.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DISTILL_SCRIPTS = ("distill.py",)


def child_exit_code(exc: BaseException) -> int | None:
    """The exit code of the failed child process behind a launcher exception, None if it is not one."""
    if isinstance(exc, subprocess.CalledProcessError):
        return exc.returncode
    failure = getattr(exc, "get_first_failure", None)     # torch.distributed.elastic ChildFailedError
    if failure is not None:
        code = failure()[1].exitcode
        return code if code > 0 else 1
    return None


def run_launch(argv: list[str]) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    if not args.module and Path(args.training_script).name in DISTILL_SCRIPTS:
        from fewstep.distill import preflight

        preflight(list(args.training_script_args))
    try:
        launch_command(args)
    except Exception as exc:
        code = child_exit_code(exc)
        if code is None:
            raise
        sys.exit(code)
