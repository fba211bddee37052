"""The errors cdfkd raises for things a user can fix; each message names the problem and the fix.

A leaf module (imports nothing of ours), so every layer can raise and catch them.
The CLI prints these without a traceback (``-vv`` adds it).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config, spec or command line that cannot run; the message names each problem and its fix."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing or corrupt here and could not be downloaded."""


class StorageError(OSError):
    """A run or sweep folder cannot be written (permissions, a full disk); the previous
    files are intact and the message says what to free or change."""


#: what the command line reports as "cdfkd: error: ..." (exit 1) instead of a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError, EnsembleError and every other invalid value
    KeyError,  # an unknown registry name (the message lists the known ones)
    DatasetUnavailableError,
    NonFiniteLossError,
    StorageError,
)
