"""The exceptions the CLI turns into one line and an exit code: bad input (2) and a signal that
stopped the command (128 + the signal's number: SIGINT 130, SIGTERM 143)."""

import signal


class UsageError(Exception):
    """Bad input from the user: an unknown key or value, a missing or malformed file."""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwind (closing the MLflow run as FAILED) and exit 128 + signum.

    A ``BaseException`` that is not a ``KeyboardInterrupt``, so Lightning passes it through as it is
    (its own handling would turn Ctrl-C into exit code 1 and SIGTERM into exit code 0)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
