"""The project's own error types. Every expected failure is one of these, with one clear line."""


class LogitpairError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(LogitpairError, ValueError):
    """An option or config value is unknown, of the wrong type or out of range."""


class DataError(LogitpairError):
    """A data file is missing, truncated or corrupt."""


class CheckpointError(LogitpairError):
    """A checkpoint is missing, corrupt, unsafe or does not match what was asked for."""


class TrainingDiverged(LogitpairError):
    """The loss or its gradients became NaN or infinite."""
