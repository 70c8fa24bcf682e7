"""Errors a user can cause. The CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Bad config, bad data, missing model, unreachable server: anything the user can fix."""


class ConfigError(UserError):
    """The config file or an override is invalid."""


class DataError(UserError):
    """A data file is missing or holds a bad row. The message names file, line and reason."""


class ModelError(UserError):
    """A model name or folder cannot be resolved or loaded."""
