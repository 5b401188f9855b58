"""The runtime's error types. Every failure a user can cause (bad bundle, bad input, unsupported
model) is one of these, so the CLI can print one line and exit 2 instead of a traceback."""

import re


class NadooError(Exception):
    """Base of every error nadoo reports to a user."""


class BundleError(NadooError):
    """The .ndc file is missing, truncated, corrupt, or of a version/feature we cannot read."""


def corrupt(msg: str):
    """Raise the BundleError of an index or payload that breaks a rule of the format."""
    raise BundleError(f"corrupt bundle: {msg}")


class InputError(NadooError):
    """Inputs given to a run do not match the model (name, shape, dtype, missing)."""


class ModelError(NadooError):
    """The model cannot run as written: an operator's attributes or constant inputs do not fit it, or a
    step would exceed the run-time size caps (format_spec/NDC-v1.md §5)."""


class UnsupportedError(NadooError):
    """The model uses something nadoo cannot compile or run (operator, attribute, dtype)."""


class CompileError(NadooError):
    """The compiler could not load, calibrate or write a model."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(msg, limit: int = 300) -> str:
    """`msg` (text or an exception) as one line of at most `limit` characters, for an error message:
    colour codes dropped (torch's exporter colours its errors), white space folded, the tail cut."""
    s = " ".join(_ANSI.sub("", str(msg)).split()) or "unknown error"
    return s if len(s) <= limit else s[: limit - 3] + "..."
