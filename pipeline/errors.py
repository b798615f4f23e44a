"""The error types a user can fix: ``UserError``, and ``DataError`` for bad input located by file, row, field.

The CLI prints such an error's message as one line and exits non-zero, never a traceback; every
subclass's message names what is wrong (file, row, field) and how to fix it. Each stage defines its
own subclasses (``CacheError``, ``HeadsError``, ``ExportError``, ...) beside the code that raises them.
"""


class UserError(Exception):
    """An error caused by input or configuration, with a message that says how to fix it."""


class DataError(UserError, ValueError):
    """Bad input, located: which file, which row (1-based line or record number), which field.

    >>> str(DataError("pairs.jsonl", 3, "chosen", "missing field"))
    "pairs.jsonl, row 3, field 'chosen': missing field"
    """

    def __init__(self, path: str, row: int | None, field: str | None, message: str):
        self.path, self.row, self.field, self.reason = str(path), row, field, message
        where = self.path
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class AlreadyReported(UserError):
    """A failure whose one error line this process has already printed (a torchrun rank that says why it stops
    while the rank that failed waits for it: torchrun stops every rank once one exits); the CLI exits 1 without
    printing it again."""

