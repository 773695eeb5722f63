"""Errors the adapter library raises. Each message says what was wrong and what to do about it."""


class AdapterError(Exception):
    """Base class: anything the user can fix (a file, a folder, a setting)."""


class AdapterFileError(AdapterError):
    """An adapter file is missing, corrupt, truncated, pickled, foreign or from an unknown format version."""


class AdapterMismatchError(AdapterError):
    """An adapter does not fit the LLM or the UNet it is used with."""


class LLMLoadError(AdapterError):
    """An LLM folder is missing, incomplete or of an unsupported architecture."""


class ConfigError(AdapterError):
    """A configuration value is invalid."""
