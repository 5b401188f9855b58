"""Calibration data: parse `--input-shape`, load `--calib` files (npz or folder of npy), or make
synthetic samples from the model's input specs.

Calibration arrays are keyed by model input name; the first axis is the sample axis and is the
model's batch axis (axis 0 of every input).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.files import load_arrays

log = logging.getLogger(__name__)

__all__ = ["InputSpec", "parse_input_shapes", "load_calibration", "synthetic_calibration"]


@dataclass
class InputSpec:
    """One model input. `shape` entries are ints for static dims, str/None for dynamic dims."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: list = field(default_factory=list)  # list[int | str | None]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_dynamic(self, axis: int) -> bool:
        d = self.shape[axis]
        return not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0


# --------------------------------------------------------------------------------------------
# --input-shape parsing

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/\-]*$")


def _parse_dims(text: str, item: str) -> list[int]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]") or text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    parts = [p.strip() for p in re.split(r"[,x×]", text)] if text else []
    if not parts or any(p == "" for p in parts):
        raise CompileError(
            f"bad --input-shape {item!r}: expected NAME=D0,D1,... or D0,D1,... (e.g. x=1,64)"
        )
    dims = []
    for p in parts:
        try:
            d = int(p)
        except ValueError:
            raise CompileError(
                f"bad --input-shape {item!r}: dimension {p!r} is not an integer "
                f"(expected e.g. x=1,64)"
            ) from None
        if d <= 0:
            raise CompileError(f"bad --input-shape {item!r}: dimension {d} must be positive")
        dims.append(d)
    return dims


def parse_input_shapes(items) -> dict[str, list[int]]:
    """Parse repeated `--input-shape` values.

    `x=1,64` → {"x": [1, 64]}; a bare `1,64` (only allowed once, for a single-input model) →
    {"": [1, 64]}. Raises CompileError with one line on bad syntax or duplicates.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, list[int]] = {}
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise CompileError(f"bad --input-shape {item!r}: empty value (expected e.g. x=1,64)")
        s = item.strip()
        if "=" in s:
            name, _, dims_text = s.partition("=")
            name = name.strip()
            if not name or not _NAME_RE.match(name):
                raise CompileError(
                    f"bad --input-shape {item!r}: {name!r} is not a valid input name "
                    f"(expected NAME=D0,D1,..., e.g. x=1,64)"
                )
        else:
            name, dims_text = "", s
        dims = _parse_dims(dims_text, item)
        if name in out:
            what = f"input {name!r}" if name else "an unnamed shape"
            raise CompileError(f"--input-shape given twice for {what}")
        out[name] = dims
    if "" in out and len(out) > 1:
        raise CompileError(
            "--input-shape without a NAME= prefix is only allowed for a single-input model; "
            "name every input as NAME=D0,D1,..."
        )
    return out


# --------------------------------------------------------------------------------------------
# calibration loading

def _read_npz(path: str) -> dict[str, np.ndarray]:
    data = load_arrays(path, "calibration file", CompileError)
    if not isinstance(data, dict):
        raise CompileError(f"calibration file {path} is a single .npy array; name it <input>.npy or save an .npz")
    return data


def _read_npy(path: str) -> np.ndarray:
    data = load_arrays(path, "calibration file", CompileError)
    if isinstance(data, dict):
        raise CompileError(f"cannot read calibration file {path}: not a valid .npy (an .npz archive; use np.save)")
    return data


def _require_finite(data: dict[str, np.ndarray], path: str) -> None:
    """NaN/Inf samples would poison every statistic calibration takes (and end in a failed Cholesky
    factorisation in GPTQ): refuse them, naming the array."""
    for k, v in data.items():
        if v.dtype.kind == "f" and v.size:
            bad = v.size - int(np.count_nonzero(np.isfinite(v)))
            if bad:
                n_nan = int(np.count_nonzero(np.isnan(v)))
                raise CompileError(
                    f"calibration array {k!r} in {path} has {n_nan} NaN and {bad - n_nan} infinite values "
                    f"(of {v.size}, as {v.dtype}); calibration needs finite numbers"
                )


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    """float64→float32, int32→int64, int64→int32, bool→int, int→float are fine; float→int is not."""
    if src == dst:
        return True
    sk, dk = src.kind, dst.kind
    if dk == "f":
        return sk in "fiub"
    if dk in "iu":
        return sk in "iub"
    if dk == "b":
        return sk == "b"
    return np.can_cast(src, dst, casting="same_kind")


def load_calibration(path: str, specs=None) -> dict[str, np.ndarray]:
    """Load calibration samples from an `.npz` file or a folder of `<input>.npy` files.

    Arrays are keyed by input name, first axis = samples (= the model's batch axis). With `specs`
    the data is validated (names, sample counts, rank, static dims, dtype) and cast to the spec
    dtypes. Raises CompileError with one clear line on any problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CompileError(f"calibration data not found: {path}")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".npy"))
        if not files:
            raise CompileError(
                f"calibration folder {path} has no .npy files (expected one <input_name>.npy per input)"
            )
        data = {f[: -len(".npy")]: _read_npy(os.path.join(path, f)) for f in files}
    else:
        if path.endswith(".npy"):
            arr = _read_npy(path)
            if specs is not None and len(specs) == 1:
                data = {specs[0].name: arr}
            elif specs is None:
                data = {os.path.basename(path)[: -len(".npy")]: arr}
            else:
                raise CompileError(
                    f"calibration file {path} is a single .npy but the model has {len(specs)} inputs "
                    f"({', '.join(s.name for s in specs)}); use an .npz keyed by input name"
                )
        else:
            data = _read_npz(path)
    if not data:
        raise CompileError(f"calibration data {path} contains no arrays")
    for k, v in data.items():
        if v.ndim == 0:
            raise CompileError(
                f"calibration array {k!r} is a scalar; the first axis must be the sample axis"
            )
        if v.shape[0] == 0:
            raise CompileError(f"calibration array {k!r} has 0 samples")
        if v.dtype.kind not in "fiub":
            raise CompileError(
                f"calibration array {k!r} has unsupported dtype {v.dtype} (need numeric arrays)"
            )
    if specs is None:
        counts = {k: v.shape[0] for k, v in data.items()}
        if len(set(counts.values())) > 1:
            raise CompileError(
                "calibration arrays have different numbers of samples: "
                + ", ".join(f"{k}={n}" for k, n in counts.items())
            )
    else:
        data = _validate(data, list(specs), path)
    _require_finite(data, path)  # after the cast: float64 beyond float32's range becomes inf
    return data


def _validate(data: dict[str, np.ndarray], specs: list, path: str) -> dict[str, np.ndarray]:
    expected = [s.name for s in specs]
    exp_txt = ", ".join(expected)
    # a single unnamed/mis-named array for a single-input model is unambiguous only if named
    # correctly; we insist on names so a multi-file setup can't silently mix inputs up.
    missing = [n for n in expected if n not in data]
    unknown = [k for k in data if k not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if unknown:
            parts.append("unknown " + ", ".join(unknown))
        raise CompileError(
            f"calibration data {path} does not match the model inputs: {'; '.join(parts)} "
            f"(expected arrays named: {exp_txt})"
        )
    counts = {n: data[n].shape[0] for n in expected}
    if len(set(counts.values())) > 1:
        raise CompileError(
            "calibration arrays have different numbers of samples: "
            + ", ".join(f"{k}={n}" for k, n in counts.items())
        )
    out = {}
    for spec in specs:
        arr = data[spec.name]
        shape = list(spec.shape)
        if arr.ndim != len(shape):
            raise CompileError(
                f"calibration array {spec.name!r} has shape {tuple(arr.shape)} (rank {arr.ndim}) "
                f"but the input has rank {len(shape)} {_fmt_shape(shape)}; the first axis is the "
                f"sample/batch axis"
            )
        for ax in range(1, len(shape)):
            if not spec.is_dynamic(ax) and int(shape[ax]) != arr.shape[ax]:
                raise CompileError(
                    f"calibration array {spec.name!r} has shape {tuple(arr.shape)} but the input "
                    f"needs {_fmt_shape(shape)} (axis {ax} must be {shape[ax]}; axis 0 is the samples)"
                )
        dst = np.dtype(spec.dtype)
        if not _castable(arr.dtype, dst):
            raise CompileError(
                f"calibration array {spec.name!r} has dtype {arr.dtype} but the input is {dst}; "
                f"convert it (e.g. np.{dst}) before saving" if arr.dtype.kind != "f" else
                f"calibration array {spec.name!r} is {arr.dtype} but the input is {dst}; float data "
                f"cannot be used for an integer input"
            )
        if arr.dtype != dst:
            with np.errstate(over="ignore"):  # float64 beyond float32's range: _require_finite names it
                arr = arr.astype(dst)
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# --------------------------------------------------------------------------------------------
# synthetic calibration

def synthetic_calibration(specs, n: int = 32, seed: int = 0, seq_len: int = 16) -> dict[str, np.ndarray]:
    """Random samples matching `specs`: standard normal floats; small non-negative ints (< 100)
    for integer inputs (all ones for names containing "mask", zeros for "token_type"); bools all
    True. Axis 0 (dynamic or not) gets `n` samples; other dynamic axes get `seq_len`."""
    msg = (
        "no calibration data given: using synthetic random inputs, which give a poor activity "
        "profile (pass --calib with real samples for a useful layout/quantization)"
    )
    warnings.warn(msg, stacklevel=2)
    log.warning(msg)
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        dims = []
        for ax, d in enumerate(spec.shape):
            if ax == 0:
                dims.append(n)
            elif spec.is_dynamic(ax):
                dims.append(seq_len)
            else:
                dims.append(int(d))
        dt = np.dtype(spec.dtype)
        lname = spec.name.lower()
        if dt.kind == "f":
            arr = rng.standard_normal(dims).astype(dt)
        elif dt.kind in "iu":
            if "mask" in lname:
                arr = np.ones(dims, dtype=dt)
            elif "token_type" in lname:
                arr = np.zeros(dims, dtype=dt)
            else:
                arr = rng.integers(0, 100, size=dims).astype(dt)
        elif dt.kind == "b":
            arr = np.ones(dims, dtype=dt)
        else:
            raise CompileError(f"cannot make synthetic data for input {spec.name!r} of dtype {dt}")
        out[spec.name] = arr
    return out
