"""One exception family for everything a user can get wrong.

Each error is raised where the bad value enters the package (config, checkpoint,
image, prompt, sampling settings) and names the field and what is allowed.
"""


class MagmaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MagmaError, ValueError):
    """An unknown config name or field, or a field value out of range."""


class CheckpointError(MagmaError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


class DownloadError(MagmaError):
    """A file that could not be fetched (network, HTTP status, size, checksum)."""


class ImageError(MagmaError, ValueError):
    """An image that cannot be fetched, decoded or is too large."""


class PromptError(MagmaError, ValueError):
    """A prompt that is empty, malformed or too long for the sequence length."""


class SamplingError(MagmaError, ValueError):
    """A sampling setting (seed, top_p, top_k, temperature, max_out_tokens) out of range."""


class ResourceError(MagmaError):
    """The machine lacks the memory or disk a config needs; says what would fit."""


class NumericalError(MagmaError, RuntimeError):
    """NaN or infinite logits: weights that are broken or belong to another model. A RuntimeError
    too, which is what sampling from NaN logits raised before this check existed."""
