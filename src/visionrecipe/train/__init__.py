"""Training: from a resolved config to a finished run directory.

    import visionrecipe
    run = visionrecipe.train(data="digits", epochs=5)   # this package is callable: train.loop.train
    run = visionrecipe.resume("runs/x")

loop.py is the loop; build.py resolves the config once and builds what a run needs (also for the
doctor, tune and evaluate); state.py the exact-resume state (TrainState, state.pt); budget.py the
--time-budget plan; callbacks.py what each epoch records; launch.py starts torchrun; optim.py,
schedule.py, augment.py, tasks.py, finetune.py its parts.
"""

from visionrecipe import make_callable

make_callable(__name__, "visionrecipe.train.loop", "train")
