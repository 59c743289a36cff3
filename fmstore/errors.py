"""The exceptions fmstore raises: one base class, so callers can catch everything fmstore-specific."""

from __future__ import annotations

from typing import Any


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
    """Stored bytes that do not form a complete, well-formed blob (truncated, bad header);
    ``file``, where known: the shard file it is in (a verify report names it)."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


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


class CodecError(CorruptBlobError):
    """An encoded blob that does not decode: damaged chunk, bad header, wrong size."""


class CodecConfigError(FmstoreError):
    """A codec name or configuration this fmstore does not know."""


class ChecksumError(CorruptBlobError):
    """Bytes read back do not match the checksum recorded when they were saved.  ``tensor``,
    ``file`` and ``chunk`` (the index of the checksum chunk, None for a whole-stream check)
    say where."""

    def __init__(
        self, message: str, tensor: str | None = None, file: str | None = None, chunk: int | None = None
    ) -> None:
        super().__init__(message, file=file)
        self.tensor, self.chunk = tensor, chunk


class ManifestError(FmstoreError):
    """A manifest that is malformed, of an unknown version, or names a file it may not."""


class TableError(ValueError):
    """A shard table (:mod:`fmstore.checkpoint.shardtable`) that is not well formed; its reader
    says whose (a manifest's: a :class:`ManifestError`, a rank report's: a :class:`ReportError`).
    ``row``: the row at fault, where one is."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class ReportError(FmstoreError):
    """The ranks' reports of a save do not add up to a snapshot (a malformed report, ranks that
    disagree on a tensor, a tensor not fully saved)."""


class SnapshotNotFoundError(FmstoreError, KeyError):
    """No committed snapshot of that step (or none at all) under a root, or no such tensor."""

    def __str__(self) -> str:
        return str(self.args[0])


class SnapshotDeletedError(SnapshotNotFoundError):
    """The snapshot was deleted (another process's retention) while it was being loaded."""


class UnsupportedValueError(FmstoreError, TypeError):
    """A state value that cannot be stored as a tensor or JSON; the message names its path."""


class LoadMismatchError(FmstoreError, ValueError):
    """A snapshot tensor does not fit the target tensor it is loaded into (dtype or shape)."""


class StateKeysError(LoadMismatchError, KeyError):
    """A strict load whose target and snapshot do not hold the same keys; names both sides'."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]) -> None:
        super().__init__(message)
        self.missing = missing  # in the target, not in the snapshot
        self.unexpected = unexpected  # in the snapshot, not in the target

    def __str__(self) -> str:  # KeyError would print only repr(message)
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # torch DCP pickles errors between ranks
        return (type(self), (self.args[0], self.missing, self.unexpected))

    @classmethod
    def of(cls, step: int, missing: list[str], unexpected: list[str], hint: str = "") -> StateKeysError:
        """The error for snapshot ``step`` and a target with these key differences (the first
        few of each side named), ``hint`` appended."""

        def some(keys: list[str], shown: int = 8) -> str:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            return ", ".join(repr(k) for k in keys[:shown]) + more

        parts = []
        if missing:
            parts.append(f"the target has {some(missing)}, which the snapshot lacks")
        if unexpected:
            parts.append(f"the snapshot has {some(unexpected)}, which the target lacks")
        message = f"snapshot step {step} does not fit the load target: {'; '.join(parts)}{hint}"
        return cls(message, missing, unexpected)


class PointerError(FmstoreError, ValueError):
    """A checkpoint path that is not a readable fmstore pointer file; the message names it."""


class PointerNotFoundError(PointerError, FileNotFoundError):
    """No file at a checkpoint path."""


class PendingPointerError(PointerError):
    """A pointer whose save has not committed (still in flight, or interrupted by a crash), and
    that names no earlier committed checkpoint either: nothing at that path can be loaded."""
