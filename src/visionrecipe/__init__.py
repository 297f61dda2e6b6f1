"""visionrecipe: train, check, evaluate and deploy image classifiers.

    import visionrecipe
    run = visionrecipe.train(data="digits", model="seedcnn", epochs=5)
    run.evaluate()["accuracy"], run.predict(["some.png"], topk=3)
"""

import importlib
import sys
import types

from visionrecipe.errors import VisionRecipeError

__version__ = "0.1.0"
__all__ = ["VisionRecipeError", "train", "resume", "evaluate", "predict", "Run", "Config"]


def __getattr__(name):
    # Lazy: `import visionrecipe` stays fast and torch-free until something is used.
    # `train` and `evaluate` are the stage packages, callable as the functions (see make_callable).
    if name in ("train", "evaluate"):
        return importlib.import_module(f"visionrecipe.{name}")
    if name == "resume":
        from visionrecipe.train.loop import resume

        return resume
    if name == "predict":
        from visionrecipe.deploy.predict import predict

        return predict
    if name == "Run":
        from visionrecipe.rundir import Run

        return Run
    if name == "Config":
        from visionrecipe.config import Config

        return Config
    raise AttributeError(name)


def make_callable(package: str, module: str, function: str) -> None:
    """Make stage package `package` callable as `module.function` (train/ and evaluate/ use it).

    `visionrecipe.train(...)` and `visionrecipe.evaluate(...)` are the public API, and `train/`
    and `evaluate/` are also the stage folders: importing a submodule binds the package to that
    name on `visionrecipe`, so the package itself must be the function. A module's class may be
    replaced with one that has `__call__`; the call imports its target lazily, keeping
    `import visionrecipe` fast and torch-free."""

    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module), function)(*args, **kwargs)

    CallablePackage.__call__.__doc__ = f"{module}.{function}"
    sys.modules[package].__class__ = CallablePackage
