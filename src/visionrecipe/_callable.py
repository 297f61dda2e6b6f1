"""`visionrecipe.train(...)` and `visionrecipe.evaluate(...)` are the public API, and `train/` and
`evaluate/` are also the stage folders: importing a submodule binds the package to that name on
`visionrecipe`, so the package itself must be the function. A module's class may be replaced
(Python ≥ 3.5) with one that has `__call__`; the call imports its target lazily, keeping
`import visionrecipe` fast and torch-free.
"""

from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, module: str, function: str) -> None:
    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module), function)(*args, **kwargs)

    CallablePackage.__call__.__doc__ = f"{module}.{function}"
    sys.modules[package].__class__ = CallablePackage
