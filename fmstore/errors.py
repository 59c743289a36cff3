"""The exceptions fmstore raises: one base class, so callers can catch everything fmstore-specific."""

from __future__ import annotations


class FmstoreError(Exception):
    """Base class of every error fmstore raises on purpose."""


class BlobNotFoundError(FmstoreError, KeyError):
    """A key that no tier (or not the tier asked) holds.

    Subclasses ``KeyError`` so ``except KeyError`` and ``dict``-style code keep working.
    """

    def __init__(self, key: str, where: str | None = None) -> None:
        self.key = key
        self.where = where
        super().__init__(key)

    def __str__(self) -> str:  # KeyError would print only repr(key)
        place = f" in {self.where}" if self.where else ""
        return f"no blob with key {self.key!r}{place}"


class InvalidKeyError(FmstoreError, ValueError):
    """A key that is not a safe relative name (empty, absolute, '..', reserved, ...)."""


class CapacityError(FmstoreError):
    """A value does not fit: larger than a tier's capacity, or no room could be made."""


class StorageError(FmstoreError, OSError):
    """A storage operation failed (disk full, permissions, I/O): the message names the step or
    file and the URL; ``errno`` is the original's, which is ``__cause__``.  An ``OSError``, so
    ``except OSError`` keeps working."""

    @classmethod
    def of(cls, cause: OSError, message: str) -> StorageError:
        """The error for ``cause`` with ``message`` (``[Errno N]`` first where it has one)."""
        return cls(cause.errno, message) if cause.errno is not None else cls(message)


class WaitTimeoutError(FmstoreError, TimeoutError):
    """A wait with a ``timeout`` (a save's ``handle.wait``, a prefetch's ``wait``) ran out; what
    it waited for goes on in the background."""


class CorruptBlobError(FmstoreError):
    """Stored bytes that do not form a complete, well-formed blob (truncated, bad header)."""


class ConfigError(FmstoreError, ValueError):
    """Bad configuration: an unknown URL scheme, a size string that does not parse, ..."""


class WriterConflictError(FmstoreError):
    """Another writer holds the checkpoint root (or took it over from this one): one job
    writes a root at a time (see :mod:`fmstore.checkpoint.lease`)."""


class RootNotFoundError(FmstoreError):
    """A storage root that is not there: a directory opened for reading only, or a missing
    or misspelt bucket (which would otherwise look like a root with nothing in it)."""


class KernelBuildError(FmstoreError, RuntimeError):
    """The CUDA toolchain is missing or a kernel does not compile (an fmstore error; still a
    ``RuntimeError`` for code that caught it as one)."""
