"""A TorchScript archive (``torch.jit.save``) → a ScriptModule, to be exported like any torch module.

A TorchScript archive cannot unpickle arbitrary objects (its unpickler resolves GLOBALs only as
TorchScript types), but its code runs when nadoo traces the model for export, and TorchScript can
write files (``torch.save``, ``torch.from_file(shared=True)``): without ``allow_pickle``
`check_torchscript_code` reads the archive's code first and refuses those calls.
"""
from __future__ import annotations

import io
import tokenize
import zipfile

from nadoo.runtime.errors import CompileError, one_line

from .archive_safety import FILE_OPS, TRUST_HINT
from .error_text import err_text
from .torch_io import import_torch


def load_torchscript(path: str, allow_pickle: bool):
    torch = import_torch()
    if not allow_pickle:
        check_torchscript_code(path)
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise CompileError(one_line(f"cannot load TorchScript archive {path}: {err_text(e)}")) from None


def _file_call(source: str) -> str | None:
    """First `torch.save(` / `torch.from_file(` / `ops.aten.save(`-like call in TorchScript source
    (its serialized code is Python syntax; tokens, so line continuations cannot hide a call)."""
    prev: list[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.type == tokenize.NAME and tok.string in FILE_OPS and len(prev) == 2 \
                and prev[1] == "." and prev[0] in ("torch", "aten"):
            return f"{prev[0]}.{tok.string}"
        prev = (prev + [tok.string])[-2:]
    return None


def check_torchscript_code(path: str) -> None:
    """Refuse a TorchScript archive whose code writes or maps files when the model runs."""
    try:
        with zipfile.ZipFile(path) as zf:
            sources = [(i.filename, zf.read(i)) for i in zf.infolist()
                       if i.filename.endswith(".py") and ("/code/" in i.filename or i.filename.startswith("code/"))]
    except (zipfile.BadZipFile, OSError) as e:
        raise CompileError(f"cannot read TorchScript archive {path}: {e}") from None
    for name, data in sources:
        try:
            found = _file_call(data.decode("utf-8"))
        except (UnicodeDecodeError, tokenize.TokenError, SyntaxError):
            raise CompileError(f"{path}: refusing to run this TorchScript model: its code ({name}) "
                               f"cannot be checked; {TRUST_HINT}") from None
        if found:
            raise CompileError(f"{path}: refusing to run this TorchScript model: its code ({name}) calls "
                               f"{found}, which accesses files; {TRUST_HINT}")
