"""Byte sizes as people write them ("4GiB", "512MiB", "1e9"): torch-free, so a config can be
checked where torch is not imported (the router)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Decimal units follow SI, binary ones IEC (as Kubernetes does): "2G" is 2e9, "2GiB" 2**31.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "4GiB", "512MiB", "2G", "1e9", "1.5 GB" or 1073741824.

    Units are case-insensitive: K/M/G/T (optionally with B) are powers of 1000, Ki/Mi/Gi/Ti
    (optionally with B) powers of 1024. A fractional result is rounded down. Raises ValueError
    for anything else, including negative sizes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must be non-negative, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size must be a string or int, got {text!r}")
    match = _SIZE_RE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(B, K/KB, M/MB, G/GB, T/TB, KiB, MiB, GiB, TiB), e.g. '4GiB' or '1e9'"
        )
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:  # the regex should make this unreachable
        raise ValueError(f"invalid size {text!r}") from exc
    return int(number * unit)
