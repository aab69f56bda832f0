"""Errors a user can act on. The CLI prints their message and exits 2, no traceback."""

__all__ = ["PrvrError", "DataError", "RegistryError", "SearchIndexError", "RequestError",
           "CheckpointError"]


class PrvrError(Exception):
    """Base class: the message names the file, key or ids at fault."""


class DataError(PrvrError):
    """A collection on disk does not follow the public feature-release format."""


class CheckpointError(PrvrError):
    """A checkpoint is missing, unreadable or built for another configuration."""


class RegistryError(PrvrError):
    """The model registry refused or failed an operation; nothing was changed."""


class SearchIndexError(PrvrError):
    """A video index is missing, corrupt, or built by another model version."""


class RequestError(PrvrError):
    """A bad inference request (answered with HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
