"""Errors a user can cause. Each carries one clear sentence; the CLI prints it and exits 2
(an `Interrupted` run exits 128 + the signal's number).

Imports nothing from the package.
"""


class FlashSAEError(Exception):
    """Base class for every error caused by user input (files, flags, data)."""


class ConfigError(FlashSAEError, ValueError):
    """An option or combination of options is invalid."""


class DataError(FlashSAEError, ValueError):
    """Input data is missing, malformed, non-finite or of the wrong shape."""


class ArtifactError(FlashSAEError):
    """A run directory or saved model is missing, corrupt or of an unknown format."""


class DistributedError(FlashSAEError):
    """A data-parallel run lost a rank: a peer exited or stopped answering within the timeout."""


class Interrupted(FlashSAEError):
    """Training stopped by a signal (SIGINT, SIGTERM) after writing a checkpoint for --resume.

    `signum` is the signal's number, if known; the CLI exits with 128 + signum (130, 143).
    """

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 1
