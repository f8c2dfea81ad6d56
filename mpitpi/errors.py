"""The one exception type for problems the user can fix.

An ``MpitpiError`` carries a message that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero; every other exception is a bug and is reported with
its traceback (see ``cli.main``).
"""


class MpitpiError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched shard folder."""


class CollectiveError(MpitpiError):
    """An MpitpiError that every rank of the job raised together (see comm.Comm.checked).

    Every rank leaves in step, so the job can end normally: only rank 0 prints it.
    """
