"""One exception type for every problem a user can fix.

Raised where input enters (CLI, config, data spec, checkpoint, HTTP request); the CLI
prints it as a single line ``error: <message>`` and exits with status 2.
"""


class VisionRecipeError(Exception):
    """A problem with the user's input: missing path, bad value, wrong file."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: state saved; `exit_code` is 130 or 143."""

    def __init__(self, exit_code: int, run_dir, processes: int = 1):
        nproc = f" --nproc {processes}" if processes > 1 else ""
        super().__init__(f"interrupted; resume with: visionrecipe train --resume {run_dir}{nproc}")
        self.exit_code = exit_code


class TrainingStopped(VisionRecipeError):
    """Training cannot continue (a NaN loss); the last good checkpoint is kept."""

    exit_code = 1
