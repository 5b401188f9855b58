"""nadoo runtime: open .ndc bundles and run them with NumPy alone (no torch, ever).

    import nadoo.runtime as nd
    sess = nd.Session("model.ndc", policy=nd.Policy("topk", bits="4", topk=0.5))
    outputs = sess.run(None, {"x": x})

Names are resolved lazily so that importing the package (and the CLI) costs nothing until used,
and the CLI can configure the BLAS thread pool before NumPy is first imported.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "reader", "BundleError": "errors", "InputError": "errors", "ModelError": "errors", "NadooError": "errors",
    "UnsupportedError": "errors", "Policy": "policy", "Session": "session", "AttentionPolicy": "sparse_attention",
}


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'nadoo.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = sorted(_EXPORTS)
