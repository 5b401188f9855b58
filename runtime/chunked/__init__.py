"""The weight-bearing ops of the `nadoo` domain, one module each (base.py: the interface).

Importing this package imports every module in it, which registers its ops: a new op is one more
module here, named for the op, and nothing else changes.
"""

import importlib
import pkgutil

from .base import REGISTRY, ChunkedOp, OpEnv, WeightOp, WholeWeightOp, builders, cache_victim, classes_in, pin_hot, register
from .store import WeightStore

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["REGISTRY", "ChunkedOp", "OpEnv", "WeightOp", "WeightStore", "WholeWeightOp", "builders", "cache_victim", "classes_in",
           "pin_hot", "register"]
