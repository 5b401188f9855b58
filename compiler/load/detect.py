"""Which kind of model file a path holds, told by extension and content (never by unpickling).

torch writes three different zip layouts (TorchScript, torch.export .pt2, torch.save) and a legacy
pickle form; ONNX is a protobuf without a magic number, so it is recognised by parsing it.
"""
from __future__ import annotations

import os
import zipfile

from nadoo.runtime.errors import CompileError, one_line

# first bytes of a pickle (protocol 2+) and of torch.save's pre-zip format
_PICKLE_START = b"\x80"
_LEGACY_TORCH_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 "


def detect(path: str) -> str:
    """Return one of "onnx", "torchscript", "export", "torch_save", or raise CompileError."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        return _zip_kind(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_PICKLE_START) or head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch_save"
    try:
        import onnx

        m = onnx.load_model(path, load_external_data=False)
        if m.graph.node or m.graph.output:
            return "onnx"
    except Exception:
        pass
    if head[:2] == b"PK":
        raise CompileError(f"cannot read {path}: truncated or corrupt zip archive (torch.save / TorchScript / .pt2)")
    raise CompileError(
        f"unknown model format: {path} (expected .onnx, a TorchScript archive, a torch.export .pt2, "
        f"or a torch.save state_dict)"
    )


def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception as e:
        raise CompileError(f"cannot read {path}: corrupt zip archive ({one_line(e)})") from None
    # torch puts every member under one top folder named after the file; compare without it
    base = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if any(n.endswith("constants.pkl") for n in names) or any("/code/" in n or n.startswith("code/") for n in names):
        return "torchscript"
    if ("archive_format" in base or "models/model.json" in base
            or any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names)):
        return "export"
    if "data.pkl" in base:
        return "torch_save"
    raise CompileError(
        f"unknown model format: {path} is a zip archive but neither a TorchScript archive, "
        f"a torch.export .pt2 nor a torch.save file"
    )
