"""Shared helpers for the operator modules."""
from __future__ import annotations

import numpy as np

REGISTRY: dict[tuple[str, str], object] = {}


class Fallback(Exception):
    """Raised by a builder when this node's configuration is not implemented natively."""


def register(*ops: str, domain: str = ""):
    """Decorator: register a builder for one or more op types of a domain."""
    def deco(fn):
        for op in ops:
            REGISTRY[(domain, op)] = fn
        return fn
    return deco


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def as_int_list(a) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]
