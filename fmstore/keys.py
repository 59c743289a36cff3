"""Blob keys: '/'-separated relative names, checked so no key can escape a tier's root."""

from __future__ import annotations

from .errors import InvalidKeyError

#: Marker in the names of files being written; keys may not contain it and listings skip it.
TMP_MARKER = ".fmstore-tmp-"
MAX_KEY_LEN = 1024
#: A directory in a tier's root that is not part of its key space (a checkpointer backed by
#: a TieredStore keeps its snapshots there); keys may not start with it and scans skip it.
RESERVED_DIR = ".fmstore"


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid blob key, else raise :class:`InvalidKeyError` saying why."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"blob key must be a str, got {type(key).__name__}: {key!r}")
    if not key:
        raise InvalidKeyError("blob key must not be empty")
    if len(key) > MAX_KEY_LEN:
        raise InvalidKeyError(f"blob key is {len(key)} characters long; the limit is {MAX_KEY_LEN}")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise InvalidKeyError(f"blob key {key!r} is an absolute path; keys are relative names")
    if "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"blob key {key!r} contains a backslash or NUL character")
    if TMP_MARKER in key:
        raise InvalidKeyError(f"blob key {key!r} contains the reserved marker {TMP_MARKER!r}")
    if key.split("/", 1)[0] == RESERVED_DIR:
        raise InvalidKeyError(f"blob key {key!r} starts with the reserved directory {RESERVED_DIR!r}")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(
                f"blob key {key!r} has an empty, '.' or '..' component; "
                "keys are '/'-separated relative names such as 'model/layer0.weight'"
            )
    return key
