"""nadoo runtime: open .ndc bundles and run them with NumPy alone (no torch, ever)."""
__version__ = "0.1.0"
