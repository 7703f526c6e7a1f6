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


class ClusterError(Phi2SumError):
    """The Ray cluster cannot be reached or used."""


class TrainingError(Phi2SumError):
    """Training stopped because it cannot go on (e.g. the loss is no longer finite)."""


class ExportError(Phi2SumError):
    """An exported (merged) model does not match the run's own model, so it was not published."""


def user_error(exc: BaseException) -> Phi2SumError | None:
    """The user-fixable `Phi2SumError` behind `exc`, or None when `exc` is a bug.

    A Phi2SumError raised in a Ray task or actor (e.g. S3 going away while an actor writes its part) reaches the
    driver wrapped in a `RayTaskError` whose text is a remote stack trace; the original is its `.cause`. Only
    causes are followed, not `__context__`: a bug raised while handling a user error stays a bug.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        cause = cause if isinstance(cause, BaseException) else None
        if isinstance(err, Phi2SumError) and cause is None:
            return err
        todo += [cause, err.__cause__]
    return None
