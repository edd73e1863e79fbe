"""Errors a user can cause and fix; the CLI and servers turn these into clear messages, not traces."""


class ModelError(Exception):
    """Base of every user-facing model error."""


class ModelFileError(ModelError):
    """The file is missing, truncated or not GGUF."""


class UnsupportedModelError(ModelError):
    """A well-formed file we cannot run (architecture or tensor type)."""


class ModelStoreError(ModelError):
    """The model store could neither find nor fetch a verified copy."""


class ContextLengthError(ModelError):
    """A prompt that leaves no room in the context window."""
