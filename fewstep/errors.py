"""User-facing errors: every entry point prints their message on one line and exits with code 2."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

USAGE_ERROR = 2


class FewstepError(Exception):
    """Bad input from the user (config, paths, files). The message names the problem and the fix."""


def is_main_rank() -> bool:
    """Whether this process prints user errors: every process of a multi-process launch validates the same input,
    so only rank 0 says so (each still exits with the same code)."""
    return os.environ.get("RANK", "0") == "0"


def guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`; a FewstepError becomes `error: <message>` on stderr and exit code 2 (no traceback). This is the
    one wrapper of every entry point: the `fewstep` commands, `scripts/distill.py` and `python -m`."""
    try:
        return fn()
    except FewstepError as exc:
        if is_main_rank():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)
