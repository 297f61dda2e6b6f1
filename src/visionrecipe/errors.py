"""One exception type for every problem a user can fix.

Raised where input enters (CLI, config, data spec, checkpoint, HTTP request); the CLI
prints it as a single line ``error: <message>`` and exits with status 2.
"""


class VisionRecipeError(Exception):
    """A problem with the user's input: missing path, bad value, wrong file."""
