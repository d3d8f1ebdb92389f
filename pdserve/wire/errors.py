"""Errors a user can act on. The CLI prints them as one line (no traceback)."""


class PdserveError(Exception):
    """Base of every error meant for a user: the message says what is wrong and what to do."""


class CheckpointError(PdserveError):
    """A model folder is missing, incomplete, corrupt or of an unsupported architecture."""


class PromptTooLongError(PdserveError, ValueError):
    """A prompt (plus the tokens asked for) does not fit --max-model-len."""


class ConfigError(PdserveError, ValueError):
    """A flag or setting is out of range or inconsistent."""
