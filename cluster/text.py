"""Wording shared by the master's log and the command line."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def shown(value: object, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters: an error names the bad value on one line,
    however large the value (a fuzzed config file, a megabyte bind URI)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
