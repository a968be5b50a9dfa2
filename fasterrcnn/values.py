"""What an option's value must be: the parsers and checks that :mod:`fasterrcnn.options` gives its fields.

A parser takes the text of a flag or a variable and raises ValueError naming what it wants; a
check takes a parsed value and says what it must be (``must be >= 1``), or None where it is fine.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def parse_host(text: str) -> str:
    """An IP address to bind to: ``0.0.0.0`` (every IPv4 interface), ``::``, ``127.0.0.1``..."""
    try:
        return str(ipaddress.ip_address(str(text).strip()))
    except ValueError:
        raise ValueError(f"host must be an IP address such as 0.0.0.0 (every interface) or 127.0.0.1 "
                         f"(this machine only), got {text!r}") from None


def at_least(low: int, why: str = "") -> Check:
    return lambda value: f"must be >= {low}{why}" if value < low else None


def between(low: int, high: int) -> Check:
    return lambda value: f"must be >= {low}" if value < low else f"must be <= {high}" if value > high else None


def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"
