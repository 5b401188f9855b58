"""The checks every validating `from_json` of the schema (schema.py, index_schema.py) is built from: where a
value sits (`Where`, for the one-line BundleError), scalars, names, shapes, dtypes, and the capped JSON
parse."""

from __future__ import annotations

import json

import numpy as np

from .errors import BundleError
from .format import (
    DTYPES, MAX_DIM, MAX_ELEMENTS, MAX_JSON_CONTAINERS_FLOOR, MAX_NAME_LEN, MAX_RANK, JSON_BYTES_PER_CONTAINER,
)

INT64 = 1 << 63


class Where:
    """Where a value sits, for the one-line error: `Where("corrupt bundle: graph").fail("...")`."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str):
        self.prefix = prefix

    def fail(self, msg: str):
        raise BundleError(f"{self.prefix}: {msg}")


INDEX = Where("corrupt bundle")


# ------------------------------------------------------------------------------------- scalars
def is_int(x) -> bool:
    return type(x) is int and -INT64 <= x < INT64


def is_number(x) -> bool:
    return (type(x) is int and -INT64 <= x < INT64) or type(x) is float


def check_name(x, what: str, w: Where = INDEX) -> str:
    if not isinstance(x, str) or not 0 < len(x) <= MAX_NAME_LEN:
        w.fail(f"{what} must be a string of 1..{MAX_NAME_LEN} characters")
    return x


def check_shape(shape, what: str, w: Where = INDEX) -> int:
    """A concrete shape: a list of at most MAX_RANK ints in [0, MAX_DIM]; returns its element count."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        w.fail(f"{what}: shape must be a list of at most {MAX_RANK} dims")
    n = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            w.fail(f"{what}: bad dimension {d!r}")
        n *= d
    if n > MAX_ELEMENTS:
        w.fail(f"{what}: {n} elements exceed the cap")
    return n


def check_dtype(dt, what: str, w: Where = INDEX) -> np.dtype:
    if not isinstance(dt, str) or dt not in DTYPES:
        w.fail(f"{what}: unsupported dtype {dt!r}")
    return np.dtype(dt).newbyteorder("<")


def check_int(x, lo: int, hi: int, what: str, w: Where) -> int:
    if type(x) is not int or not lo <= x <= hi:
        w.fail(f"{what} must be an int in [{lo}, {hi}], got {short(x)}")
    return x


def check_numbers(x, n: int | None, what: str, w: Where) -> list:
    # is_number of every entry, its type tests done by set(map(type, x)) in C: Gemma's index has 64k
    # such numbers (per-chunk errors), checked at every open
    kinds = set(map(type, x)) if isinstance(x, list) else None
    if kinds is None or not kinds <= {int, float} or (int in kinds and not all(is_number(v) for v in x)):
        w.fail(f"{what} must be a list of numbers")
    if n is not None and len(x) != n:
        w.fail(f"{what} has {len(x)} entries, expected {n}")
    return x


def check_object(x, what: str, w: Where) -> dict:
    if not isinstance(x, dict):
        w.fail(f"{what} must be an object")
    return x


def short(x) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


# ------------------------------------------------------------------------------------- JSON
def load_json(raw: bytes, what: str, max_bytes: int):
    """Parse canonical JSON within the spec's caps. Besides the byte cap, objects and arrays (the values
    that cost Python the most memory, ~25x their text) are limited to one per JSON_BYTES_PER_CONTAINER
    bytes on average; counting `{` and `[` bytes over-counts (brackets inside strings) and is cheap."""
    if len(raw) > max_bytes:
        INDEX.fail(f"{what} is {len(raw)} bytes, over the cap of {max_bytes}")
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS_FLOOR + len(raw) // JSON_BYTES_PER_CONTAINER:
        INDEX.fail(f"{what} holds {containers} JSON objects/arrays in {len(raw)} bytes, more than the spec allows")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        INDEX.fail(f"{what} is not valid UTF-8 JSON")
