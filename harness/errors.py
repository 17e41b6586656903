"""The harness's exceptions: bad input, and how a run ends early.

Bad input: a data file, a row, a field or a model name that the harness cannot use. Each error is raised where the problem is found, with a message that says what is wrong, where
(file, row, field) and what to do. `harness` prints such an error as one paragraph and exits 2
(`--traceback` shows the Python traceback instead); any other exception is a bug and keeps its
traceback. The config reader's `ConfigError` (harness/config/load.py) is reported the same way.

A run cut off: `RunPruned` (a sweep's pruner stopped it), `RunDiverged` (a non-finite loss or
gradient norm); `CUT_OFF` maps them, and Ctrl-C, to the status its summary records.
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


# ----------------------------------------------------------------------------- runs cut off


class RunPruned(Exception):
    """Raised by an eval hook to stop a run early (a sweep's pruner); the run ends as `pruned`."""


class RunDiverged(Exception):
    """A non-finite training loss (of a micro-batch) or gradient norm at optimizer step `step`:
    the run ends as `diverged`, and the optimizer never stepped on it."""

    def __init__(self, step: int, quantity: str, value: float):
        super().__init__(f"step {step}: {quantity} is {value}")
        self.step, self.quantity, self.value = step, quantity, value

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (self.step, self.quantity, self.value)


CUT_OFF = {KeyboardInterrupt: "interrupted", RunPruned: "pruned", RunDiverged: "diverged"}
