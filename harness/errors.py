"""Bad input: a data file, a row, a field or a model name that the harness cannot use.

Each error is raised where the problem is found, with a message that says what is wrong, where
(file, row, field) and what to do. `harness` prints such an error as one paragraph and exits 2
(`--traceback` shows the Python traceback instead); any other exception is a bug and keeps its
traceback. The config reader's `ConfigError` (harness/config/load.py) is reported the same way.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input, reported to the user as one paragraph."""


class DataError(InputError, ValueError):
    """A data problem, naming the file, the row (0-based) and the field."""


class DataFileMissing(DataError):
    """A data file named by its URL is in no local data folder and could not be downloaded.
    `reason` is why the download failed."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (str(self), self.reason)


class ModelNotFound(InputError, FileNotFoundError):
    """model.name names nothing loadable here: no tiny model, local directory or GGUF file of
    that name, and the hub could not load it."""
