"""visionrecipe: train, check, evaluate and deploy image classifiers.

    import visionrecipe
    run = visionrecipe.train(data="digits", model="seedcnn", epochs=5)
    run.evaluate()["accuracy"], run.predict(["some.png"], topk=3)
"""

from .errors import VisionRecipeError

__version__ = "0.1.0"
__all__ = ["VisionRecipeError", "train", "resume", "evaluate", "predict", "Run", "Config"]


def __getattr__(name):
    # Lazy: `import visionrecipe` stays fast and torch-free until something is used.
    if name in ("train", "resume"):
        from . import trainer

        return getattr(trainer, name)
    if name == "evaluate":
        from .evaluate import evaluate_run

        return evaluate_run
    if name == "predict":
        from .predict import predict

        return predict
    if name == "Run":
        from .run import Run

        return Run
    if name == "Config":
        from .config import Config

        return Config
    raise AttributeError(name)
