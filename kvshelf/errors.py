"""Errors kvshelf raises on bad input. Each message names what was wrong and what is allowed."""


class KVShelfError(Exception):
    """Base class for every error kvshelf raises on purpose."""


class ConfigError(KVShelfError, ValueError):
    """A configuration key has a bad value (the message names the key and the allowed values)."""


class ModelNotFoundError(KVShelfError, FileNotFoundError):
    """The requested model is neither a local HF folder nor a model kvshelf can provision offline."""


class UnsupportedModelError(KVShelfError, ValueError):
    """The model's architecture is not one the model runner implements."""


class PromptError(KVShelfError, ValueError):
    """The prompt is empty, too long for the model, or otherwise unusable."""


class Interrupted(KVShelfError):
    """A forward pass was stopped between two layers because its caller no longer wants the result (a
    client gone, a deadline passed). Nothing computed by it is stored."""
