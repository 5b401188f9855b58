"""Error text from what torch and onnx raise, for the one-line CompileErrors of the loaders.

The folding and cutting to one line is `nadoo.runtime.errors.one_line`, used project-wide; these
helpers only choose which part of a (chained, often page-long) exception is worth that line.
"""
from __future__ import annotations

import re

from nadoo.runtime.errors import one_line

# a line of an exporter error naming the operator or feature that stopped it
_TELLING_LINE = re.compile(r"(unsupported|not supported|no .*function|aten::|torch\.ops\.|operator)", re.I)


def err_text(e: BaseException) -> str:
    """`Type: message` of `e` on one line (the type alone when the message is empty): a bare message
    from deep inside torch ("list index out of range") says little without the exception type."""
    return f"{type(e).__name__}: {one_line(e, 1000)}" if str(e).strip() else type(e).__name__


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception `e` was raised from: torch wraps the error that matters in layers of
    its own ("failed to export", "dynamo error", ...)."""
    seen = set()
    c = e
    while id(c) not in seen:
        seen.add(id(c))
        nxt = c.__cause__ or (c.__context__ if not c.__suppress_context__ else None)
        if nxt is None:
            break
        c = nxt
    return c


def export_error_text(e: BaseException) -> str:
    """One informative line from a (very verbose) torch.onnx exporter error: the root cause's line
    naming an operator or unsupported feature if there is one, else its first line."""
    root = root_cause(e)
    lines = [one_line(ln, 1000) for ln in str(root).splitlines() if ln.strip()]
    pick = next((ln for ln in lines if _TELLING_LINE.search(ln)), lines[0] if lines else type(root).__name__)
    return f"{type(root).__name__}: {pick}"
