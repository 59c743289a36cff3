"""The save options a writer takes besides its policy, checked one way: ``compression=`` and
``codec=`` mean the same, and a bad value is the same :class:`~fmstore.errors.ConfigError`, in
:class:`~fmstore.checkpoint.Checkpointer` and in the integrations that take them before a
checkpointer exists (Lightning's ``FmstoreCheckpointIO``)."""

from __future__ import annotations

from ..codec import registry
from ..errors import ConfigError

#: ``compression=`` values: None (raw) or the lossless chain.
COMPRESSION: dict[str | None, str | None] = {None: None, "lossless": "lossless"}

__all__ = ["COMPRESSION", "check_save_options", "check_limits"]


def check_save_options(compression: str | None = None, codec: str = registry.AUTO) -> tuple[str | None, str]:
    """``(compression, codec)`` as a save uses them: ``compression`` one of the save pipeline's
    ``COMPRESSION`` (None: raw, or ``"lossless"``), ``codec`` resolved by the codec registry
    (``"auto"``, a lossless codec's name or an alias of one); anything else is a
    :class:`~fmstore.errors.ConfigError` naming the choices."""
    if compression not in COMPRESSION:
        raise ConfigError(f"compression must be one of {sorted(COMPRESSION, key=str)}, got {compression!r}")
    return COMPRESSION[compression], registry.choose(codec)


def check_limits(keep_last: object, max_persists: object, when_busy: object) -> None:
    """Check a checkpointer's retention and backpressure options (a :class:`ConfigError`
    naming the bad one)."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if not isinstance(max_persists, int) or isinstance(max_persists, bool) or max_persists < 1:
        raise ConfigError(f"max_persists must be an int >= 1, got {max_persists!r}")
    if when_busy not in ("wait", "skip"):
        raise ConfigError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
