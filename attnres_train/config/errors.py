"""One exception type for every bad user input, so entry points can print a single clear line.

Every validation error names the offending config field (e.g. ``model.residual.num_blocks``) so a user
launching a sweep sees exactly which override is wrong, without a traceback.
"""


class ConfigError(ValueError):
    """A config value is invalid. ``field`` is the dotted config path, ``message`` says why."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class UserInputError(RuntimeError):
    """Bad input that is not a config field: a data file, a checkpoint, a path. Printed without traceback."""
