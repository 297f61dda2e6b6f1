"""visionrecipe: train, check, evaluate and deploy image classifiers.

    import visionrecipe
    run = visionrecipe.train(data="digits", model="seedcnn", epochs=5)
    run.evaluate()["accuracy"], run.predict(["some.png"], topk=3)
"""

import importlib

from visionrecipe.errors import VisionRecipeError

__version__ = "0.1.0"
__all__ = ["VisionRecipeError", "train", "resume", "evaluate", "predict", "Run", "Config"]


def __getattr__(name):
    # Lazy: `import visionrecipe` stays fast and torch-free until something is used.
    # `train` and `evaluate` are the stage packages, callable as the functions (see _callable.py).
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
