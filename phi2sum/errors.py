"""User-facing errors.

Every problem a user can fix (bad config, bad data, unreachable storage, missing model) is raised as a
`Phi2SumError` whose message is one line naming the problem and the fix. The CLI and the jobs print that
line and exit non-zero instead of showing a stack trace.
"""


class Phi2SumError(Exception):
    """A problem the user can fix; the message names it and says how."""


class ConfigError(Phi2SumError):
    """The job config has an unknown key or a bad value."""


class DataError(Phi2SumError):
    """The input data is missing, malformed or empty."""


class StorageError(Phi2SumError):
    """A local path or S3 location cannot be read or written."""


class ModelError(Phi2SumError):
    """The base model, tokenizer or adapter cannot be loaded."""


class TrainingError(Phi2SumError):
    """Training stopped because it cannot go on (e.g. the loss is no longer finite)."""
