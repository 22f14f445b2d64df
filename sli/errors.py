"""The few exceptions sli raises. Each message names the problem and the fix."""


class SLIError(Exception):
    """Base class of sli's own errors."""


class CacheError(SLIError):
    """The layer cache cannot store or serve an entry (disk full, unwritable, too large)."""


class ModelLoadError(SLIError):
    """A model directory is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(SLIError):
    """The model's layout cannot be streamed layer by layer."""
