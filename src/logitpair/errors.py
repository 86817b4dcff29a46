"""The project's own error types. Every expected failure is one of these, with one clear line."""


class LogitpairError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(LogitpairError, ValueError):
    """An option or config value is unknown, of the wrong type or out of range.

    ``option``: the setting at fault, as the field name of its options dataclass (``n``,
    ``batch_size``); the message reads ``"n: expected >= 1, got 0"``, and the command line,
    which alone knows flags, shows it as ``--n`` (:func:`logitpair.cli.main.describe`).
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        self.option, self.message = option, message
        super().__init__(f"{option}: {message}" if option else message)


class DataError(LogitpairError):
    """A data file is missing, truncated or corrupt."""


class CheckpointError(LogitpairError):
    """A checkpoint is missing, corrupt, unsafe or does not match what was asked for."""


class TrainingDiverged(LogitpairError):
    """The loss or its gradients became NaN or infinite."""
