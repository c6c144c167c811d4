"""Argument types and output helpers that every ``glimpseprune`` command shares."""

from __future__ import annotations

import argparse
import sys

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def int_at_least(minimum: int):
    """argparse type: a whole number >= ``minimum`` (``--limit 0`` or ``--batch-size -1`` is an error, not an empty
    run; a seed is >= 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def check_device(name: str) -> str:
    """A torch device this machine has, or ``ValueError`` naming what is missing (before any model loads)."""
    from ..validation import check_device as check

    try:
        check(name)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
    return name


def _note(args, text: str) -> None:
    """A progress or status line: stderr (stdout is for results), silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _say(args, text: str) -> None:
    """A human-readable result line: stdout, or a note on stderr when --json puts the result on stdout."""
    if getattr(args, "json", False):
        _note(args, text)
    else:
        print(text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """Arguments that were not UTF-8 reach Python as surrogate escapes: show them as \\x.. instead of failing."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
