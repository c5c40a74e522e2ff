"""Sizes as administrators type and read them: 10G, 512M, 1.5T (binary units, like lvcreate -L).

parse_size() rejects anything it cannot read exactly, or beyond 8 EiB; format_size() prints a short form."""

from __future__ import annotations

import re

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
MAX_SIZE = (1 << 63) - 1
MAX_TEXT = 64
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size like '10G', '512m', '1.5TiB' or '4096'; ValueError with the reason otherwise."""
    if isinstance(text, bool):
        raise ValueError("a size is a number, not true or false")
    if isinstance(text, int):
        value = text
    else:
        if len(text) > MAX_TEXT:
            raise ValueError(f"invalid size {text[:16]!r}...: longer than {MAX_TEXT} characters")
        match = _SIZE.match(text)
        if not match:
            raise ValueError(f"invalid size {text!r}: use a number with an optional unit K, M, G, T, P or E (powers of 1024)")
        number, unit = match.groups()
        scale: int = UNITS[unit.upper()]
        whole, _, frac = number.partition(".")
        value = int(whole) * scale
        if frac:
            value += int(frac) * scale // 10 ** len(frac)
            if int(frac) * scale % 10 ** len(frac):
                raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    if value < 0:
        raise ValueError(f"size {value} is negative")
    if value > MAX_SIZE:
        raise ValueError(f"size {text!r} is 8 EiB or more, larger than any pool")
    return value


def format_exact(size: int) -> str:
    """The size in the largest unit that holds it whole, as parse_size() reads it back: 61441M, 60G, 4097B."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return f"{size}B"


def format_size(size: int) -> str:
    """A short human form: 1.00G, 512.00M, 4.00K, 300B."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        if size >= UNITS[unit]:
            return f"{size / UNITS[unit]:.2f}{unit}"
    return f"{size}B"
