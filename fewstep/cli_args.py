"""Argument types and checks shared by the `fewstep` commands, so every value is checked while parsing, before
any model loads, and a bad one is reported on one line (exit code 2) naming the flag and the fix."""
from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from fewstep.errors import USAGE_ERROR, FewstepError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error:` line (plus where to read the usage), not a usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def guidance_scale(text: str) -> float:
    """A CFG scale as the stock pipelines read it: 1 switches guidance off, values below 1 are not guidance."""
    value = _number(text, float, "a number")
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (1 = no guidance; got {text})")
    return value


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def int_list(text: str, flag: str) -> list[int]:
    """'1,4,50' -> [1, 4, 50]; anything else is a FewstepError naming the flag."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise FewstepError(f"{flag} {text!r} is not a comma-separated list of positive integers; "
                           f"pass e.g. {flag} 1,4,50")
    return values


def pick_device(device: str | None) -> str:
    """`--device`: cpu, cuda or cuda:N (default: cuda when available), checked against this machine."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise FewstepError(f"--device {device!r} is not a device; pass cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FewstepError(f"--device {device} but CUDA is not available here; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise FewstepError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
