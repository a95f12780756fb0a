"""Sub-commands of ``fdistill`` and what they share: bounded integer options and one-line error messages."""
from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """Bad command-line input: reported as ``fdistill <command>: error: ...`` with exit code 2."""


def bounded_int(minimum: int, maximum: int):
    """An argparse ``type``: an integer in minimum .. maximum; anything else is refused naming the allowed range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            allowed = f"a positive integer, at most {maximum:,}" if minimum == 1 else \
                f"an integer in {minimum} .. {maximum:,}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = f"integer in {minimum} .. {maximum}"         # argparse names the type in some messages
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite float (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def one_line(error: BaseException) -> str:
    """An exception's message on one line. Errors re-raised from a data-loader worker carry the worker's traceback
    after the message: their last line is the original ``Type: message``."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].strip()
    return " ".join(line.strip() for line in lines) or type(error).__name__
