"""Shared helpers for the operator modules."""
from __future__ import annotations

import numpy as np

REGISTRY: dict[tuple[str, str], object] = {}


class Fallback(Exception):
    """Raised by a builder when this node's configuration is not implemented natively."""


def registrar(table: dict):
    """A decorator factory filing a function under one or more op types of a domain in `table` (the
    kernel builders below, the size rules of sizes.py)."""
    def file_under(*ops: str, domain: str = ""):
        def deco(fn):
            for op in ops:
                table[(domain, op)] = fn
            return fn
        return deco
    return file_under


# Decorator: register a builder for one or more op types of a domain.
register = registrar(REGISTRY)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def as_int_list(a) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]
