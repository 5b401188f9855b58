"""A TorchScript archive (``torch.jit.save``) → a ScriptModule, to be exported like any torch module.

Its code runs when the model is traced for export, so without ``allow_pickle`` the archive's code is
checked first (archive_safety.check_torchscript_code refuses calls that read or write files).
"""
from __future__ import annotations

from nadoo.runtime.errors import CompileError, one_line

from .archive_safety import check_torchscript_code
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
