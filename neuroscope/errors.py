"""Errors a user can act on: each message says what went wrong and what to do."""


class NeuroscopeError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ConfigError(NeuroscopeError, ValueError):
    """A bad argument or combination of arguments."""


class SAEError(NeuroscopeError, ValueError):
    """An SAE file that cannot be used as asked."""


class BackendUnavailable(NeuroscopeError, ImportError):
    """The asked-for backend is not installed or cannot run here."""


class ModelLoadError(NeuroscopeError, OSError):
    """A model that cannot be found or read."""
