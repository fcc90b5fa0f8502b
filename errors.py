"""The errors that end a command with one line `error: <what and where>. <what to do>`
(exit code 2). Every module raises these; none of them imports another module of this
project. ArgumentParser is argparse's, with its errors raised as these."""

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a bad value, a flag unknown or missing) are a
    UserError, so they end in one line, not a usage block then the error."""

    def error(self, message):
        raise UserError(f"{message}. See `python {self.prog} --help`")


def one_line_errors(main):
    """Run a script's main(): a UserError or ServerError ends it in one line on stderr and
    exit code 2."""
    try:
        return main()
    except (UserError, ServerError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
