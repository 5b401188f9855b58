"""Build llama.cpp, the C++ reference the LM benchmark compares nadoo with, from the sources inside the
PyPI sdist of llama-cpp-python 0.3.36 (it bundles ggml-org/llama.cpp 0c1e570). Nothing of it is
committed or imported: the binaries land in a cache folder and are only run as separate processes.

    python tools/llama_cpp.py            # prints the folder holding llama-bench, llama-perplexity, ...

Build: cmake Release, -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF, and -mno-amx-* added to
ggml-cpu's -march=native flags: its AMX kernels die with an illegal instruction on this VM, which
advertises AMX that it does not let a process use. The build is cached (≈10 min on two cores).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("NADOO_CACHE", Path.home() / ".cache" / "nadoo"))
TARGETS = ("llama-bench", "llama-perplexity", "llama-completion")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def _sources() -> Path:
    src = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    sdist = CACHE / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(sdist.parent)], check=True)
    with tarfile.open(sdist) as t:
        t.extractall(CACHE, filter="data")
    return src


def _patch_march(src: Path) -> None:
    """Append the no-AMX flags right after ggml-cpu's x86 -march=native (a later flag wins)."""
    cm = src / "ggml" / "src" / "ggml-cpu" / "CMakeLists.txt"
    text = cm.read_text()
    if NO_AMX.split()[0] in text:
        return
    old = "list(APPEND ARCH_FLAGS -march=native)"
    if old not in text:
        raise SystemExit(f"{cm}: no '{old}' line to patch (a different llama.cpp version?)")
    cm.write_text(text.replace(old, f"list(APPEND ARCH_FLAGS -march=native {NO_AMX})", 1))


def build() -> Path:
    """The folder of the built binaries (built once, then reused)."""
    src = _sources()
    out = src / "build" / "bin"
    if all((out / t).exists() for t in TARGETS):
        return out
    _patch_march(src)
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(src / "build"), "--config", "Release", "-j", str(os.cpu_count() or 2),
                    "--target", *TARGETS], check=True)
    return out


if __name__ == "__main__":
    print(build())
