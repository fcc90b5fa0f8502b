"""The errors that end a command with one line `error: <what and where>. <what to do>`
(exit code 2). Every module raises these; none of them imports another module."""

import sys


class UserError(Exception):
    """A mistake in the arguments, data, checkpoint or output folder."""


class DataError(UserError, ValueError):
    """A data file is missing or malformed."""


class RunFileError(UserError):
    """A run folder, or one of its files (run_files.py), that cannot be read."""


class ServerError(RuntimeError):
    """A served model failed after its retries: the run stops with this one-line message.
    `status` is the last HTTP status, None when the server gave none."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def one_line_errors(main):
    """Run a script's main(): a UserError or ServerError ends it in one line on stderr and
    exit code 2."""
    try:
        return main()
    except (UserError, ServerError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
