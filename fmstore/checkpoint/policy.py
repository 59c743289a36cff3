"""Multi-level checkpoint policy: which snapshots are kept where.

A :class:`Policy` keeps the newest snapshots in host memory (restored without touching
storage), writes those whose step is a multiple of ``every`` to the checkpointer's root
(local NVMe, typically), and those whose step is a multiple of each :class:`Level`'s
``every`` to further places (object storage).  Each place is a complete, independent
snapshot store: its own manifests, its own incremental references, its own retention; so a
snapshot on S3 never depends on files that only the local disk holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..keys import RESERVED_DIR
from ..storage import FsspecStorage, scheme_of
from ..storage.url import LOCAL_SCHEMES
from ..store import TieredStore
from ..tiers.base import Tier
from ..tiers.disk import LocalTier
from ..tiers.object import ObjectTier
from .host_level import HOST

#: Where a checkpointer backed by a TieredStore keeps snapshots inside each durable tier.
STORE_PREFIX = f"{RESERVED_DIR}/checkpoints"


@dataclass
class Level:
    """A durable place for snapshots besides the root, e.g. ``Level("s3://bucket/run", every=1000)``.

    ``root`` is a directory, an fsspec URL or a durable tier (:class:`LocalTier`,
    :class:`ObjectTier`) of a :class:`TieredStore`; the level takes the snapshots whose step
    is a multiple of ``every`` and keeps its newest ``keep_last`` (None: all).
    """

    root: str | os.PathLike[str] | Tier
    every: int = 1
    keep_last: int | None = None
    storage_options: dict[str, Any] | None = None
    name: str | None = None


@dataclass
class Policy:
    """Where snapshots go, fastest first.

    Parameters:
        host_memory: keep the newest N snapshots in host memory; ``load`` restores from there
            without reading storage (same process, same sharding).  Costs N + 1 copies of this
            rank's state in host memory while a save is staged.
        every: the checkpointer's root takes the snapshots whose step is a multiple of this.
        levels: further durable places, slower ones last (object storage).
        name: what the root level is called in listings and errors.
    """

    host_memory: int = 0
    every: int = 1
    levels: Sequence[Level] = field(default_factory=list)
    name: str | None = None


@dataclass
class LevelSpec:
    """A resolved durable level: where it is and which snapshots it takes."""

    name: str
    url: str
    storage_options: dict[str, Any] | None
    every: int
    keep_last: int | None
    fs: Any = None  # an already open fsspec filesystem (an ObjectTier's)


def resolve(
    root: str | os.PathLike[str] | TieredStore,
    storage_options: dict[str, Any] | None,
    keep_last: int | None,
    policy: Policy | None,
) -> tuple[int, list[LevelSpec]]:
    """(snapshots kept in host memory, durable levels fastest first) for a checkpointer."""
    policy = policy if policy is not None else Policy()
    if not isinstance(policy, Policy):
        raise ConfigError(f"policy must be an fmstore.Policy, got {type(policy).__name__}")
    _check_count("Policy.host_memory", policy.host_memory, zero_ok=True)
    _check_count("Policy.every", policy.every)
    host_memory = policy.host_memory
    extra = list(policy.levels)
    if isinstance(root, TieredStore):
        durable = [t for t in root.tiers if t.durable]
        if not durable:
            raise ConfigError(
                "a TieredStore used as a checkpoint root needs a durable tier (local or object)"
            )
        if host_memory == 0 and len(durable) < len(root.tiers):
            host_memory = 1  # the store has a memory tier: keep the newest snapshot there
        if not extra:
            extra = [Level(t) for t in durable[1:]]
        root_spec = _tier_spec(durable[0], policy.every, keep_last, policy.name)
    else:
        url = os.fspath(root)
        root_spec = LevelSpec(
            policy.name or _default_name(url), url, storage_options, policy.every, keep_last
        )
    specs = [root_spec]
    for lvl in extra:
        if not isinstance(lvl, Level):
            raise ConfigError(f"Policy.levels takes fmstore.Level objects, got {type(lvl).__name__}")
        _check_count(f"Level({lvl.root!r}).every", lvl.every)
        if lvl.keep_last is not None:
            _check_count(f"Level({lvl.root!r}).keep_last", lvl.keep_last)
        if isinstance(lvl.root, Tier):
            specs.append(_tier_spec(lvl.root, lvl.every, lvl.keep_last, lvl.name))
        else:
            url = os.fspath(lvl.root)
            specs.append(
                LevelSpec(lvl.name or _default_name(url), url, lvl.storage_options, lvl.every, lvl.keep_last)
            )
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or HOST in names:
        raise ConfigError(
            f"checkpoint levels need distinct names other than 'host' (host memory), got {names}; pass name=..."
        )
    return host_memory, specs


def _tier_spec(tier: Tier, every: int, keep_last: int | None, name: str | None) -> LevelSpec:
    """Snapshots inside a store's durable tier, in a directory the tier's keys cannot reach,
    through the tier's own connection where it has one (an object store's)."""
    if not isinstance(tier, (LocalTier, ObjectTier)):
        raise ConfigError(
            f"tier {tier.name!r} ({type(tier).__name__}) cannot hold checkpoints; use a LocalTier or ObjectTier"
        )
    storage = tier.storage
    if not isinstance(storage, FsspecStorage):  # a local directory
        return LevelSpec(name or tier.name, storage.path(STORE_PREFIX), None, every, keep_last)
    return LevelSpec(
        name or tier.name,
        f"{storage.url.rstrip('/')}/{STORE_PREFIX}",
        None,
        every,
        keep_last,
        fs=(storage.fs, storage.path(STORE_PREFIX)),
    )


def _default_name(url: str) -> str:
    scheme = scheme_of(url)
    return "local" if scheme in LOCAL_SCHEMES else scheme  # "s3", "gs", "memory"


def _check_count(what: str, value: Any, *, zero_ok: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
        raise ConfigError(f"{what} must be an int >= {0 if zero_ok else 1}, got {value!r}")
