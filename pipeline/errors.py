"""The one base class for errors a user can fix (bad input, bad config, a mismatched cache).

The CLI prints such an error's message as one line and exits non-zero, never a traceback; every
subclass's message names what is wrong (file, row, field) and how to fix it.
"""


class UserError(Exception):
    """An error caused by input or configuration, with a message that says how to fix it."""


USER_ERRORS = (UserError,)
