"""PyTorch Lightning (2.5+) integration: fmstore snapshots behind Lightning's checkpoint API.

Two ways in, for two kinds of job:

* :class:`FmstoreCheckpointIO` -- ``Trainer(plugins=[FmstoreCheckpointIO()])``.  Lightning's
  own ``ModelCheckpoint`` (top-k, ``last``, ``-v1`` counters, ``fit(ckpt_path="last")``) keeps
  deciding *what* to save and remove; each save becomes an async, incremental fmstore snapshot,
  and the file Lightning names becomes a small JSON **pointer** to it: claimed (written
  *pending*) the moment the save starts, so Lightning's ``-vN`` counter sees the name taken, and
  loadable only once the snapshot has committed.  For strategies whose checkpoint state is
  whole on global rank 0 (single device, DDP, FSDP with full state dicts).
* :class:`FmstoreCheckpoint` -- a callback that checkpoints on fmstore's own schedule (every k
  steps, a :class:`fmstore.Policy` for host memory / local / object storage) on any strategy:
  every rank saves its own shards (FSDP2, tensor parallel), and a rerun resumes bit-exact.

What the peers get wrong, and what is done here instead:

* Lightning's ``AsyncCheckpointIO`` wrote tensors that training was still changing, so one
  checkpoint could mix two steps (Lightning #20953); its fix clones the whole checkpoint on the
  training thread (#21079), a second full copy in memory and time.  Here the copy goes once, into
  fmstore's (pinned) buffer pool; with ``block=False`` parameter and optimizer-state copies run
  under the next forward/backward, and fmstore's optimizer step pre-hook
  (:func:`fmstore.checkpoint.watch_optimizer_steps`) makes the next ``optimizer.step()`` wait for them, so every
  snapshot holds exactly the weights of its step.
* ``AsyncCheckpointIO`` runs ``remove_checkpoint`` at once, while the save of its replacement is
  still in flight: a crash then leaves neither.  Here removals go through the same ordered queue
  as commits (see below), so a removal never precedes the commit of the checkpoint that replaces
  it, and ``Checkpointer.delete`` never deletes bytes that a kept snapshot references.
* With sharded strategies (``FSDPStrategy(state_dict_type="sharded")``, ``ModelParallelStrategy``)
  Lightning writes a torch DCP directory itself and never calls the CheckpointIO (#20205), so a
  CheckpointIO plugin cannot see sharded state at all.  :class:`FmstoreCheckpoint` saves from a
  callback on every rank instead, DTensor shards included.
* Lightning restarts a plain (not ``state_dict``-able) ``DataLoader`` at a mid-epoch resume with
  a new shuffle (it warns so), and keeps no RNG state.  Both drop-ins keep the data position
  (``_DataPosition``): torch's global RNG state from which the epoch's iterator was made (the
  ``RandomSampler``'s seed and the workers' base seed come from it), the batches consumed, and
  the RNG states at the save.  A resume makes the epoch's iterator again from that state, fetches
  and drops the consumed batches (the skip costs what loading them costs; ``skip_seconds``) and
  continues exactly as the uninterrupted run.  Because Lightning makes the first epoch's
  iterator before any callback hook, it is made once more at ``on_train_start`` from a state
  kept then.  The plugin learns of its Trainer only at its first save (or load), so a fresh
  fit's first epoch is covered only with ``Trainer(callbacks=[plugin.data_position])``; without
  it, a checkpoint of that epoch resumes as stock Lightning does, and the save warns.  What
  cannot be restored is said at save time, once per loader, naming it: an ``IterableDataset``
  without ``state_dict``/``load_state_dict``, or a loader that is not a ``DataLoader`` and has no
  state (loaders with ``state_dict`` are restored by Lightning itself).  Lightning's own warning
  that the data loader "is not resumable" still appears for a replayed plain ``DataLoader``.
  The plugin keeps the position of global rank 0 (the one process saving Lightning
  checkpoints); every rank resumes from it.
* ``AsyncCheckpointIO(FmstoreCheckpointIO())`` is refused with a ``ConfigError`` (at its first
  save, raised by the next save or the Trainer's teardown, or at once on a load/removal): the
  wrapper's teardown never reaches the plugin, and the plugin is asynchronous already.

Pointer file (the file at the path Lightning names; UTF-8 JSON, one object)::

    {"format": "fmstore.lightning-pointer", "version": 1, "root": ".fmstore", "step": 12,
     "global_step": 10, "epoch": 0}

``root`` is the snapshot root: relative to the pointer's directory when it lies inside it
(so a checkpoint directory can be moved or copied whole), else an absolute path or a URL;
``step`` is the fmstore snapshot id; ``token`` (a random id, also in the snapshot's meta) tells
the save's snapshot from another one that reuses the step id after a crash.
``global_step``/``epoch`` are informational.  While the save runs, the file holds the same object
with ``"pending": true`` and ``"previous"``: what the path held before (a pointer, a pending
one with its own ``previous`` when saves to one path overlap, or null).  A pending pointer is
never loaded as such: :func:`read_pointer` raises :class:`PendingPointerError`, and
``load_checkpoint`` loads the newest committed pointer of its chain (what the path meant before
an interrupted save; a warning says so) or raises :class:`PendingPointerError` if there is none.
A failed save puts back what the path named before; a crashed one's claims are settled by the
plugin's first save into that directory (to the newest committed pointer of the chain, or
removed), before it hands out any step id.  Pointers are written crash-safely: local files by
temp + fsync + rename (``last.ckpt`` is replaced atomically), URLs by one PUT.  Loading never
unpickles anything: a path that is not a pointer is refused with :class:`PointerError`.

Lightning checkpoint values that are neither tensors nor JSON are stored losslessly as tagged
JSON objects ``{"__fmstore_lightning__": kind, ...}`` and turned back on load: numpy scalars
(kept as 0-d arrays), ``torch.dtype``, ``torch.device``, ``torch.Size``, ``pathlib`` paths, sets
and frozensets, ``argparse.Namespace`` and Lightning's ``AttributeDict``.  Anything else (an
arbitrary object in ``hyper_parameters``, an OmegaConf config, a namedtuple, a dict subclass
such as ``defaultdict``) is refused with :class:`fmstore.checkpoint.UnsupportedValueError`
naming its key: fmstore never pickles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import posixpath
import sys
import threading
import time
import uuid
import weakref
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fmstore.integrations import require

require("lightning", "lightning", by=__name__)
from lightning.fabric.utilities.data import AttributeDict  # noqa: E402 - after require() names the extra
from lightning.fabric.utilities.types import _Stateful  # noqa: E402 - after require() names the extra
from lightning.pytorch.callbacks import Callback, Checkpoint  # noqa: E402 - after require() names the extra
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402 - after require() names the extra
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO  # noqa: E402 - after require() names the extra
from lightning.pytorch.strategies import Strategy  # noqa: E402 - after require() names the extra
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn  # noqa: E402 - after require() names the extra

from fmstore import BackgroundJobs
from fmstore.checkpoint import (
    Checkpointer,
    LoadMismatchError,
    Manifest,
    Policy,
    RNGState,
    SaveHandle,
    SnapshotNotFoundError,
    UnsupportedValueError,
    check_save_options,
    watch_optimizer_steps,
)
from fmstore.errors import ConfigError, FmstoreError, PendingPointerError, PointerError, PointerNotFoundError
from fmstore.storage import delete_file, open_fs, write_atomic

__all__ = [
    "FmstoreCheckpointIO",
    "FmstoreCheckpoint",
    "PointerError",
    "PointerNotFoundError",
    "PendingPointerError",
    "Pointer",
    "read_pointer",
    "load_checkpoint",
    "encode_value",
    "decode_value",
    "POINTER_FORMAT",
]

POINTER_FORMAT = "fmstore.lightning-pointer"
POINTER_VERSION = 1
#: A pointer is a few hundred bytes; anything much larger is some other file (a torch.save
#: checkpoint, say), and is refused without reading it whole.
POINTER_MAX_BYTES = 64 << 10
#: The default snapshot root, next to the first checkpoint path Lightning saves.  Hidden, and
#: without the ``.ckpt`` suffix, so ModelCheckpoint's ``last*.ckpt`` scan never mistakes it.
DEFAULT_ROOT_NAME = ".fmstore"


# ---------------------------------------------------------------------------- locations


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _location(path: Any) -> str:
    """A checkpoint path as this module keeps it: a URL as given, a local path absolute."""
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ConfigError(f"a checkpoint path must be a non-empty str or os.PathLike, got {path!r}")
    return path if _is_url(path) else os.path.abspath(path.removeprefix("file://"))


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if _is_url(path) else os.path.dirname(path)


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if _is_url(directory) else os.path.join(directory, name)


def _root_text(root: str, pointer_dir: str) -> str:
    """How a pointer in ``pointer_dir`` names ``root``: relative when inside it."""
    if _is_url(root) != _is_url(pointer_dir):
        return root
    if not _is_url(root):
        rel = os.path.relpath(root, pointer_dir)
        return root if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel
    prefix = pointer_dir.rstrip("/") + "/"
    return root[len(prefix) :] if root.startswith(prefix) else root


def _root_key(root: str) -> str:
    """One spelling per snapshot root (symlinks resolved): one Checkpointer per root."""
    if _is_url(root):
        scheme, rest = root.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(root)


def _resolve_root(text: str, pointer_dir: str) -> str:
    if "://" in text:
        return _root_key(_location(text))
    return _root_key(_join(pointer_dir, text))


def _real_dirname(path: str) -> str:
    """The directory a pointer's relative root is taken from: where the file really lies (a
    ``save_last="link"`` symlink names the root as its target does)."""
    return _dirname(path) if _is_url(path) else os.path.dirname(os.path.realpath(path))


# ---------------------------------------------------------------------------- pointer files


@dataclass(frozen=True)
class Pointer:
    """A pointer file's content: the snapshot ``step`` under ``root`` (resolved: absolute or URL)."""

    path: str
    root: str
    step: int
    global_step: int | None = None
    epoch: int | None = None


def _pointer_body(
    root: str, pointer_path: str, step: int, global_step: Any, epoch: Any, token: str
) -> dict[str, Any]:
    return {
        "format": POINTER_FORMAT,
        "version": POINTER_VERSION,
        "root": _root_text(root, _root_key(_dirname(pointer_path))),  # where the file will lie
        "step": step,
        "global_step": global_step if isinstance(global_step, int) else None,
        "epoch": epoch if isinstance(epoch, int) else None,
        "token": token,
    }


def _pointer_bytes(body: dict[str, Any]) -> bytes:
    """A pointer file's bytes: a committed pointer, or a claim written the moment a save starts
    (``"pending": true`` and ``previous``, what the path meant before, itself possibly pending:
    a chain as long as the saves to one path in flight), so a crash loses nothing committed."""
    return (json.dumps(body, indent=1) + "\n").encode()


def _write_file(path: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    """Crash-safe: the old file or the whole new one (local: temp + fsync + rename; URL: one PUT)."""
    if _is_url(path):
        fs, p = open_fs(path, storage_options)
        fs.pipe_file(p, data)
    else:
        write_atomic(path, [data])


def _delete_file(path: str, storage_options: dict[str, Any] | None) -> None:
    """A pointer file (outside the root): through the storage layer."""
    delete_file(path, storage_options)


def _is_link(path: str) -> bool:
    return not _is_url(path) and os.path.islink(path)


def _read_body(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON object of the pointer file at ``path`` (``path`` as :func:`_location` gives it),
    pending or not; :class:`PointerError` (naming it) if it is anything else."""
    try:
        if _is_url(path):
            fs, p = open_fs(path, storage_options)
            data = fs.cat_file(p, start=0, end=POINTER_MAX_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(POINTER_MAX_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise PointerNotFoundError(f"no checkpoint file at {path!r}") from None
    except IsADirectoryError:
        raise PointerError(
            f"{path!r} is a directory, not an fmstore pointer file (a torch DCP checkpoint of a sharded "
            "strategy? Lightning writes those itself, past the CheckpointIO: use FmstoreCheckpoint there)"
        ) from None
    refused = (
        f"{path!r} is not an fmstore checkpoint pointer (a torch.save/pickle checkpoint?). fmstore never "
        "unpickles files; load a trusted torch checkpoint without this plugin"
    )
    if len(data) > POINTER_MAX_BYTES:
        raise PointerError(f"{refused} (it is larger than {POINTER_MAX_BYTES} bytes)")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PointerError(f"{refused} (it is not JSON)") from None
    if not isinstance(body, dict) or body.get("format") != POINTER_FORMAT:
        raise PointerError(f"{refused} (JSON without format {POINTER_FORMAT!r})")
    _check_body(path, body)
    return body


def _check_body(path: str, body: Any) -> None:
    if not isinstance(body, dict):
        raise PointerError(f"{path!r}: malformed pointer (a previous entry is not an object)")
    version, step, root = body.get("version"), body.get("step"), body.get("root")
    if not isinstance(version, int) or version > POINTER_VERSION:
        raise PointerError(
            f"{path!r}: pointer version {version!r}; this fmstore reads up to {POINTER_VERSION}"
        )
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PointerError(f"{path!r}: pointer step must be an int >= 0, got {step!r}")
    if not isinstance(root, str) or not root:
        raise PointerError(f"{path!r}: pointer root must be a non-empty string, got {root!r}")
    if body.get("pending") and body.get("previous") is not None:
        _check_body(path, body["previous"])


def _pointer_of(path: str, body: dict[str, Any]) -> Pointer:
    root = _resolve_root(body["root"], _real_dirname(path))
    return Pointer(path, root, body["step"], body.get("global_step"), body.get("epoch"))


def _chain(body: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pending pointer and the ones it replaces, newest first (a committed pointer: itself)."""
    out = []
    while body is not None:
        out.append(body)
        body = body.get("previous") if body.get("pending") else None
    return out


def read_pointer(path: Any, storage_options: dict[str, Any] | None = None) -> Pointer:
    """The pointer at ``path``; :class:`PointerError` (naming it) if it is anything else, and
    :class:`PendingPointerError` if its save has not committed yet (see
    :meth:`FmstoreCheckpointIO.load_checkpoint` for what a crash-interrupted save leaves)."""
    path = _location(path)
    body = _read_body(path, storage_options)
    if body.get("pending"):
        raise PendingPointerError(
            f"checkpoint {path!r} is pending: the save of snapshot {body['step']} it names has not committed "
            "(a save in flight, or one a crash interrupted); it cannot be loaded before its commit"
        )
    return _pointer_of(path, body)


# ---------------------------------------------------------------------------- value conversion

_TAG = "__fmstore_lightning__"
_PATH_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        pathlib.Path,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
    )
}


def _where(path: tuple[Any, ...]) -> str:
    return "checkpoint" + "".join(f"[{k!r}]" for k in path)


def encode_value(node: Any, path: tuple[Any, ...] = ()) -> Any:
    """``node`` with every value that is neither a tensor nor JSON turned into a tagged JSON
    object (see the module docstring); unchanged containers are returned as they are (so an
    ``nn.Module`` state dict keeps its ``_metadata``).  Refuses what it cannot store losslessly
    with :class:`UnsupportedValueError` naming the key."""
    if (
        isinstance(node, (torch.Tensor, np.ndarray))
        or node is None
        or isinstance(node, (bool, int, float, str))
    ):
        return node
    if isinstance(node, np.generic):
        return {_TAG: "numpy", "array": np.asarray(node)}
    if isinstance(node, AttributeDict):
        return {_TAG: "attribute_dict", "items": encode_value(dict(node), path)}
    if isinstance(node, dict):
        if type(node) not in (dict, OrderedDict):
            raise UnsupportedValueError(
                f"cannot store {_where(path)}: a {type(node).__name__} (dict subclass) would come back as "
                "a plain dict; convert it with dict(...) first"
            )
        if _TAG in node:
            raise UnsupportedValueError(
                f"cannot store {_where(path)}: the key {_TAG!r} is reserved by fmstore"
            )
        items = {k: encode_value(v, (*path, k)) for k, v in node.items()}
        if all(items[k] is v for k, v in node.items()):
            return node
        out = type(node)(items)
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(node, torch.Size):
        return {_TAG: "torch.Size", "dims": list(node)}
    if isinstance(node, (list, tuple)):
        if type(node) not in (list, tuple):
            raise UnsupportedValueError(
                f"cannot store {_where(path)}: a {type(node).__name__} would come back as a plain "
                f"{'list' if isinstance(node, list) else 'tuple'}; convert it first"
            )
        seq = [encode_value(v, (*path, i)) for i, v in enumerate(node)]
        if all(a is b for a, b in zip(seq, node)):
            return node
        return seq if isinstance(node, list) else tuple(seq)
    if isinstance(node, (set, frozenset)):
        kind = "set" if isinstance(node, set) else "frozenset"
        return {_TAG: kind, "items": [encode_value(v, (*path, f"<{kind} item>")) for v in node]}
    if isinstance(node, torch.dtype):
        return {_TAG: "torch.dtype", "name": str(node).removeprefix("torch.")}
    if isinstance(node, torch.device):
        return {_TAG: "torch.device", "name": str(node)}
    if isinstance(node, pathlib.PurePath) and type(node).__name__ in _PATH_TYPES:
        return {_TAG: "path", "class": type(node).__name__, "path": str(node)}
    if isinstance(node, argparse.Namespace):
        return {_TAG: "namespace", "items": encode_value(dict(vars(node)), path)}
    hint = ""
    if type(node).__module__.startswith("omegaconf") or (
        isinstance(node, type) and node.__module__.startswith("omegaconf")
    ):
        hint = " (an OmegaConf config: save_hyperparameters(OmegaConf.to_container(cfg)) stores a plain dict)"
    raise UnsupportedValueError(
        f"cannot store {_where(path)}: {type(node).__module__}.{type(node).__qualname__} is neither a tensor "
        f"nor a JSON value{hint}; fmstore never pickles: convert it or leave it out "
        "(e.g. in LightningModule.on_save_checkpoint)"
    )


def decode_value(node: Any) -> Any:
    """The inverse of :func:`encode_value` (unchanged containers are returned as they are)."""
    if isinstance(node, dict):
        tag = node.get(_TAG)
        if tag is not None:
            return _decode_tagged(tag, node)
        items = {k: decode_value(v) for k, v in node.items()}
        if all(items[k] is v for k, v in node.items()):
            return node
        out = type(node)(items) if type(node) in (dict, OrderedDict) else dict(items)
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(node, (list, tuple)):
        seq = [decode_value(v) for v in node]
        if all(a is b for a, b in zip(seq, node)):
            return node
        return seq if isinstance(node, list) else tuple(seq)
    return node


def _decode_tagged(tag: Any, node: dict[str, Any]) -> Any:
    try:
        if tag == "numpy":
            arr = node["array"]
            return np.asarray(arr)[()]
        if tag == "attribute_dict":
            return AttributeDict(decode_value(node["items"]))
        if tag == "torch.Size":
            return torch.Size(node["dims"])
        if tag in ("set", "frozenset"):
            items = [decode_value(v) for v in node["items"]]
            return set(items) if tag == "set" else frozenset(items)
        if tag == "torch.dtype":
            dtype = getattr(torch, node["name"])
            if isinstance(dtype, torch.dtype):
                return dtype
        elif tag == "torch.device":
            return torch.device(node["name"])
        elif tag == "path":
            cls = _PATH_TYPES[node["class"]]
            try:
                return cls(node["path"])
            except NotImplementedError:  # a WindowsPath read on POSIX (or the reverse)
                return (pathlib.PureWindowsPath if "Windows" in node["class"] else pathlib.PurePosixPath)(
                    node["path"]
                )
        elif tag == "namespace":
            return argparse.Namespace(**decode_value(node["items"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise FmstoreError(
            f"malformed {tag!r} value in a Lightning checkpoint: {type(e).__name__}: {e}"
        ) from None
    raise FmstoreError(f"unknown value kind {tag!r} in a Lightning checkpoint (written by a newer fmstore?)")


# ---------------------------------------------------------------------------- pointer claims


def _final(body: dict[str, Any]) -> dict[str, Any]:
    """A pending pointer's pointer-to-be."""
    return {k: v for k, v in body.items() if k not in ("pending", "previous")}


def _committed(ck: Checkpointer, body: dict[str, Any]) -> bool:
    """Whether the snapshot ``body`` names has committed, and is the one its save wrote (a crashed
    save's step id may have been saved again since, by another save)."""
    step = body["step"]
    if not ck.where(step):
        return False
    token = body.get("token")
    if token is None:  # written before pointers carried tokens: the step id is all there is
        return True
    try:
        meta = ck.manifest(step).meta.get("lightning")
    except SnapshotNotFoundError:
        return False
    return isinstance(meta, dict) and meta.get("token") == token


def _small_files(directory: str, storage_options: dict[str, Any] | None) -> list[str]:
    """The files in ``directory`` small enough to be pointers (links excluded: they name files)."""
    try:
        if _is_url(directory):
            fs, p = open_fs(directory, storage_options)
            return [
                fs.unstrip_protocol(e["name"])
                for e in fs.ls(p, detail=True)
                if e.get("type") == "file" and (e.get("size") or 0) <= POINTER_MAX_BYTES
            ]
        with os.scandir(directory) as it:
            return [
                e.path
                for e in it
                if e.is_file(follow_symlinks=False)
                and e.stat(follow_symlinks=False).st_size <= POINTER_MAX_BYTES
            ]
    except FileNotFoundError:
        return []


def _refuse_wrapper() -> None:
    """Refuse to be used through Lightning's ``_WrappingCheckpointIO`` (``AsyncCheckpointIO``)."""
    frame = sys._getframe(2)  # the caller of the plugin method that called this
    for _ in range(2):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), _WrappingCheckpointIO):
            raise ConfigError(
                f"FmstoreCheckpointIO cannot be wrapped in {type(frame.f_locals['self']).__name__}: it saves "
                "asynchronously itself (one copy, into fmstore's pinned pool), and the wrapper's teardown never "
                "reaches it, so its saves and threads would outlive the Trainer. Pass "
                "Trainer(plugins=[FmstoreCheckpointIO()]) directly"
            )
        frame = frame.f_back


def _called_by_launcher() -> bool:
    """Whether a Lightning process launcher (ddp_spawn's) called the plugin method calling this."""
    from lightning.pytorch.strategies.launchers.launcher import _Launcher

    return isinstance(sys._getframe(2).f_locals.get("self"), _Launcher)


def _calling_trainer() -> Any:
    """The Trainer whose Strategy called the plugin method that called this, or None (the ddp_spawn
    launcher, a direct call): a CheckpointIO is never told which Trainer it serves."""
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, Strategy):
            module = owner._lightning_module
            return getattr(module, "_trainer", None) if module is not None else None
        frame = frame.f_back
    return None


# ---------------------------------------------------------------------------- data position


def _unknown_position(dl: Any) -> str | None:
    """Why a mid-epoch resume cannot restore where ``dl`` was, or None if it can (a map-style
    DataLoader is replayed; a loader with ``state_dict`` is restored by Lightning itself)."""
    if isinstance(dl, _Stateful):
        return None
    if isinstance(dl, torch.utils.data.DataLoader):
        ds = dl.dataset
        if isinstance(ds, torch.utils.data.IterableDataset) and not isinstance(ds, _Stateful):
            return f"a DataLoader over {type(ds).__name__}, an IterableDataset without state_dict/load_state_dict"
        return None
    return f"a {type(dl).__name__}, neither a DataLoader nor an object with state_dict/load_state_dict"


class _DataPosition(Callback):
    """Where the training data stands, so that a mid-epoch resume sees exactly the batches the
    uninterrupted run saw, with a plain shuffled ``DataLoader`` (any number of workers).

    A DataLoader's order comes from torch's global CPU generator at ``iter()``: a
    ``RandomSampler`` without a generator draws its seed from it, and so does the workers' base
    seed.  Kept: that generator's state when the epoch's iterator was made, the batches training
    has taken from it, and the RNG states at the save (Lightning keeps none).  On resume
    (``on_train_start``, after Lightning made its iterator, before the first batch) the epoch's
    iterator is made again from the kept state, the consumed batches are fetched and dropped
    (the skip costs what loading them costs: ``skip_seconds``), and the RNGs are set back to
    the save's.  The first epoch's iterator, which Lightning makes before any callback hook, is
    made again at ``on_train_start`` from a state kept then (a fit with this callback therefore
    draws its first epoch's order one step further along the generator than without it).
    """

    def __init__(self) -> None:
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._trainer_ref: Callable[[], Any] = lambda: None
        self._known: tuple[torch.Tensor, Any] | None = None  # (rng at iter(), weakref to that iterator)
        self._candidate: tuple[torch.Tensor, Any] | None = None  # (rng at epoch start, iterator then)
        self._restore: dict[str, Any] | None = None
        self._warned: set[Any] = set()
        self.skipped = 0
        self.skip_seconds = 0.0

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the Trainer's callbacks
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init_runtime()

    @property
    def state_key(self) -> str:
        return "FmstoreDataPosition"

    # ------------------------------------------------------------------ hooks

    def bind(self, trainer: Any) -> None:
        """The Trainer whose position :meth:`state_dict` reports (Lightning passes it none)."""
        self._trainer_ref = _ref(trainer)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.bind(trainer)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.bind(trainer)
        # Lightning makes an epoch's iterator right after this hook (epochs after the first).
        self._candidate = (torch.get_rng_state(), _ref(_iterator(trainer)))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.bind(trainer)
        restore, self._restore = self._restore, None
        loop = trainer.fit_loop
        fetcher = loop._data_fetcher
        loaders = loop._combined_loader.flattened if loop._combined_loader is not None else []
        # Replayed: map-style DataLoaders only (a loader with state_dict is Lightning's to restore,
        # and iterating it again here would move it on).
        replay = (
            fetcher is not None
            and bool(loaders)
            and all(
                isinstance(dl, torch.utils.data.DataLoader)
                and not isinstance(dl, _Stateful)
                and _unknown_position(dl) is None
                for dl in loaders
            )
        )
        if restore is not None:
            batches, epoch_rng = restore.get("batches"), restore.get("epoch_rng")
            mid_epoch = (
                replay
                and isinstance(epoch_rng, torch.Tensor)
                and restore.get("epoch") == trainer.current_epoch
                and isinstance(batches, int)
                and 0 < batches < trainer.num_training_batches
            )
            if mid_epoch:
                self._iterate(trainer, epoch_rng)
                started = time.perf_counter()
                for _ in range(batches):
                    next(fetcher.iterator)
                self.skipped, self.skip_seconds = batches, time.perf_counter() - started
                rank_zero_info(
                    f"fmstore: resumed epoch {trainer.current_epoch} at batch {batches}: the consumed batches "
                    f"were fetched again and dropped in {self.skip_seconds:.3f} s"
                )
            if restore.get("rng") is not None:
                RNGState().load_state_dict(restore["rng"])
            if mid_epoch:
                return
        if replay:
            # An epoch starting now: its iterator is made again from a state kept here.
            self._iterate(trainer, torch.get_rng_state())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return self.position(self._trainer_ref())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore = decode_value(state) if state else None

    def position(self, trainer: Any) -> dict[str, Any]:
        if trainer is None or trainer.fit_loop._data_fetcher is None:
            return {}
        loop = trainer.fit_loop
        for i, dl in enumerate(loop._combined_loader.flattened if loop._combined_loader is not None else []):
            why = _unknown_position(dl)
            if why is not None and id(dl) not in self._warned:
                self._warned.add(id(dl))
                rank_zero_warn(
                    f"fmstore: the position of train dataloader {i} ({why}) cannot be saved; a resume from a "
                    "checkpoint taken mid-epoch restarts its iteration"
                )
        fetcher = loop._data_fetcher
        epoch_rng = self._epoch_rng(trainer)
        if epoch_rng is None and ("order", trainer.current_epoch) not in self._warned:
            self._warned.add(("order", trainer.current_epoch))
            rank_zero_warn(
                f"fmstore: the data order of epoch {trainer.current_epoch} was drawn before fmstore saw this Trainer "
                "(FmstoreCheckpointIO learns of it at its first save); a resume from a checkpoint of this epoch "
                "restarts its order. Trainer(callbacks=[plugin.data_position]) covers the first epoch too"
            )
        return encode_value(
            {
                "epoch": trainer.current_epoch,
                "batches": fetcher.fetched - len(getattr(fetcher, "batches", ())),
                "epoch_rng": epoch_rng,
                "rng": RNGState().state_dict(),
            },
            ("data_position",),
        )

    # ------------------------------------------------------------------ helpers

    def _iterate(self, trainer: Any, rng: torch.Tensor) -> None:
        torch.set_rng_state(rng)
        iter(trainer.fit_loop._data_fetcher)
        self._known = (rng, _ref(_iterator(trainer)))

    def _epoch_rng(self, trainer: Any) -> torch.Tensor | None:
        it = _iterator(trainer)
        if self._known is not None and self._known[1]() is it:
            return self._known[0]
        # Made after the last epoch start (the old iterator was another one): that state made it.
        if self._candidate is not None and self._candidate[1]() is not it and it is not None:
            self._known = (self._candidate[0], _ref(it))
            return self._known[0]
        return None


def _iterator(trainer: Any) -> Any:
    """The fit loop's current iterator over its data (a new object at every ``iter()``)."""
    combined = trainer.fit_loop._combined_loader
    return getattr(combined, "_iterator", None)


def _ref(obj: Any) -> Callable[[], Any]:
    if obj is None:
        return lambda: None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


# ---------------------------------------------------------------------------- the CheckpointIO


def _check_options(compression: Any, codec: str) -> None:
    check_save_options(compression, codec)  # the values and aliases Checkpointer takes (a ConfigError otherwise)


class FmstoreCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` storing each checkpoint as an fmstore snapshot plus a pointer file.

    ``Trainer(plugins=[FmstoreCheckpointIO()], callbacks=[ModelCheckpoint(...)])``.  Lightning calls
    ``save_checkpoint`` on global rank 0 only (``Strategy.save_checkpoint``), so one
    ``Checkpointer(root, no_dist=True)`` holds the snapshots; every rank can load them.

    Parameters:
        root: where snapshots live: a directory or fsspec URL.  Default: a hidden ``.fmstore``
            directory next to the first checkpoint path saved (ModelCheckpoint's dirpath).
        storage_options: for fsspec URLs (snapshot root and pointer paths), passed untouched.
        compression, codec, incremental, quantize, io_threads, timeout: as for
            :class:`fmstore.Checkpointer`.
        block: False (default): ``save_checkpoint`` returns while parameter and optimizer-state
            copies still run; they overlap the next forward/backward, and the next
            ``optimizer.step()`` waits for them (no second copy on the training thread, unlike
            ``AsyncCheckpointIO``'s clone, #21079).  True: returns once everything is staged.
        max_persists: snapshots that may be writing at once.  Default 2, because ModelCheckpoint
            saves twice at one step (a top-k file and ``last``): the second save then does not
            wait for the first one's write.

    Each save is a new snapshot with a fresh integer id (one more than the newest; Lightning may
    save one global_step twice), incremental (unchanged tensors are referenced), with meta
    ``{"lightning": {"path", "global_step", "epoch"}}``.  A single background queue runs, in call
    order: "wait for snapshot N's commit, write its pointer, then drop the snapshot the same path
    pointed to before" and "remove_checkpoint(path): delete the pointer, then the snapshot (its
    bytes that kept snapshots reference stay)".  So a removal never precedes the commit of its
    replacement; if a save fails, removals queued behind it are skipped (the older checkpoint is
    kept) and the error is raised by the next ``save_checkpoint``/``remove_checkpoint``/``teardown``.
    The file at ``path`` is claimed (a pending pointer) before ``save_checkpoint`` returns, so
    ModelCheckpoint's version counter never reuses a name.  ``teardown`` (Lightning's
    ``Strategy.teardown``) waits for every commit and removal and frees every thread; a removal
    in a process that saved nothing (ddp_spawn's main process) runs at once, and a save from
    ddp_spawn's launcher (after the worker's teardown) is drained before it returns, so nothing
    of the plugin outlives a finished Trainer and it pickles (``__getstate__`` waits for what is
    queued).  A process that exits without ``teardown`` still gets its pointers written
    (:mod:`fmstore.exiting`).  :attr:`data_position` is the callback keeping the data position
    (see the module docstring); the plugin adds it to its Trainer at its first save or load.
    A crash between a commit and its pointer, or
    between deleting a pointer and its snapshot, leaves an unreferenced snapshot behind, never a
    dangling pointer.  One writing process per root.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        compression: Any = None,
        codec: str = "auto",
        block: bool = False,
        incremental: bool = True,
        quantize: tuple[str, ...] | str = (),
        io_threads: int = 8,
        max_persists: int = 2,
        timeout: float = 1800.0,
    ) -> None:
        super().__init__()
        _check_options(compression, codec)
        self.root = None if root is None else _root_key(_location(root))
        self.storage_options = storage_options
        self.block = block
        self._ck_options: dict[str, Any] = dict(
            compression=compression,
            codec=codec,
            incremental=incremental,
            quantize=quantize,
            io_threads=io_threads,
            max_persists=max_persists,
            timeout=timeout,
        )
        self._init_runtime()

    def _init_runtime(self) -> None:
        # Now, not at the first save (the Checkpointer comes then): the hook learns which tensors
        # only an optimizer step changes by seeing the optimizers step, so even the first
        # block=False save can leave their copies running.
        watch_optimizer_steps()
        self._lock = threading.Lock()  # the fields below
        self._save_lock = threading.Lock()  # a save vs. deleting the newest committed snapshot
        self._path_lock = threading.Lock()  # a pointer file's claim vs. its commit or rollback
        self._cks: dict[str, Checkpointer] = {}
        self._writer_root: str | None = None
        self._next_step: int | None = None
        # One thread, in call order: commits (then their pointers) and removals.  Drained at
        # interpreter exit (fmstore.exiting), so pointers of saves in flight are still written.
        self._jobs = BackgroundJobs(
            "queued Lightning checkpoint commit(s)/removal(s)", thread_name="fmstore-lightning"
        )
        self._save_failures = 0  # saves whose commit or pointer failed (job thread)
        self._failures_told = 0  # how many of them the caller had been told of
        self._claims: dict[str, dict[str, Any]] = {}  # path -> the pending body of its newest save
        self.data_position = _DataPosition()

    # Lightning's ddp_spawn pickles the trainer with its plugins: only the configuration travels.
    # What is still queued (the launcher's removal of its temporary checkpoint, say) is waited
    # for first: the copy must not be taken while a pointer is half-way.
    def __getstate__(self) -> dict[str, Any]:
        self._jobs.wait()  # an error stays here, for the next call to raise
        return {
            "root": self.root,
            "storage_options": self.storage_options,
            "block": self.block,
            "_ck_options": self._ck_options,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ Lightning's API

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Snapshot ``checkpoint``; the file at ``path`` is claimed at once with a pending pointer
        (so Lightning's ``-vN`` counter sees the name taken), which becomes the pointer once the
        snapshot commits."""
        _refuse_wrapper()
        if storage_options is not None:
            raise ConfigError(
                f"FmstoreCheckpointIO takes no per-save storage_options (got {storage_options!r} for {path!r}); "
                "pass storage_options=... to FmstoreCheckpointIO(...)"
            )
        self._raise_errors()
        self._attach(_calling_trainer())
        launcher = _called_by_launcher()
        path = _location(path)
        state = encode_value(checkpoint)
        ck, root = self._writer(path)
        token = uuid.uuid4().hex  # ties the pointer to this save's snapshot, not to a reused step id
        meta = {
            "lightning": {
                "path": path,
                "global_step": checkpoint.get("global_step"),
                "epoch": checkpoint.get("epoch"),
                "version": checkpoint.get("pytorch-lightning_version"),
                "token": token,
            }
        }
        with self._save_lock:
            with self._lock:
                assert self._next_step is not None
                step = self._next_step
                self._next_step += 1
            handle = ck.save(step, state, block=self.block, meta=meta)
        body = _pointer_body(root, path, step, checkpoint.get("global_step"), checkpoint.get("epoch"), token)
        linked = _is_link(path)  # save_last="link" left a symlink: replaced, its target kept
        with self._path_lock:
            with self._lock:
                previous = self._claims.get(path)
            if previous is None:
                previous = self._current_body(path)
            claim = {**body, "pending": True, "previous": previous}
            try:
                _write_file(path, _pointer_bytes(claim), self.storage_options)
            except OSError as e:
                raise FmstoreError(
                    f"could not claim checkpoint {path!r} (its pending pointer): {type(e).__name__}: {e}; "
                    f"snapshot {step} is saved but nothing names it"
                ) from e
            with self._lock:
                self._claims[path] = claim
        self._jobs.submit(self._commit_job, handle, path, ck, claim, linked, label=path)
        if launcher:
            # ddp_spawn's worker saves its final weights for the main process after its Trainer
            # has torn this plugin down: nothing would drain it but the worker's exit.
            self.teardown()

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict the pointer at ``path`` names.  Tensors land on ``map_location``
        when it is a device or a device string, else on the CPU.  ``weights_only`` changes
        nothing: nothing is unpickled, ever.

        A pending pointer (its save in flight elsewhere, or interrupted by a crash) loads the
        checkpoint the path named before that save, the newest committed one of its chain (with
        a warning); one that never named a committed snapshot raises :class:`PendingPointerError`."""
        _refuse_wrapper()
        self._attach(_calling_trainer())
        self._drain(raise_errors=True)
        path = _location(path)
        chain = _chain(_read_body(path, self.storage_options))
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        for body in chain:
            pointer = _pointer_of(path, body)
            with self._open(pointer.root, must_exist=path) as ck:
                if body.get("pending") and not _committed(ck, body):
                    continue
                if body is not chain[0]:
                    warnings.warn(
                        f"fmstore: checkpoint {path!r} is pending (the save of snapshot {chain[0]['step']} did not "
                        f"commit); loading the checkpoint it replaced, snapshot {pointer.step}",
                        stacklevel=2,
                    )
                try:
                    state = ck.load(step=pointer.step, device=device)
                except SnapshotNotFoundError as e:
                    raise SnapshotNotFoundError(
                        f"checkpoint {pointer.path!r} points to a missing snapshot: {e}"
                    ) from None
                return decode_value(state)
        raise PendingPointerError(
            f"checkpoint {path!r} is pending: the save of snapshot {chain[0]['step']} it names has not committed "
            "(a save in flight in another process, or one a crash interrupted), and it replaced no committed "
            "checkpoint; it cannot be loaded"
        )

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the pointer at ``path`` and its snapshot, after every save queued before it has
        committed (in the background).  A process with no save of its own (ddp_spawn's main
        process removing the workers' temporary checkpoint) removes at once: there is nothing to
        order it after, and no thread is left behind."""
        _refuse_wrapper()
        self._raise_errors()
        path = _location(path)
        with self._lock:
            told = self._failures_told
            idle = self._writer_root is None and not self._jobs.running()
        if idle:
            self._remove_job(path, told)
        else:
            self._jobs.submit(self._remove_job, path, told)

    def teardown(self) -> None:
        """Wait for every queued commit, pointer and removal; free the checkpointers' memory and
        threads (they come back on the next use); raise the first error not yet raised."""
        try:
            self._drain(raise_errors=True)
        finally:
            with self._lock:
                cks, self._cks = list(self._cks.values()), {}
                self._writer_root, self._next_step = None, None
            self._jobs.stop()  # its thread comes back with the next job
            for ck in cks:
                ck.close()

    # ------------------------------------------------------------------ helpers

    def _attach(self, trainer: Any) -> None:
        """Put :attr:`data_position` among the Trainer's callbacks, so checkpoints hold the data
        position and a resume restores it (a CheckpointIO gets no hook of its own)."""
        if trainer is not None and all(cb is not self.data_position for cb in trainer.callbacks):
            trainer.callbacks.append(self.data_position)
            self.data_position.bind(trainer)

    def _checkpointer(self, root: str, must_exist: str | None = None) -> Checkpointer:
        """The one Checkpointer of ``root`` in this process (a delete must see its saves in flight)."""
        with self._lock:
            ck = self._cks.get(root)
            if ck is not None:
                return ck
        if must_exist is not None and not _is_url(root) and not os.path.isdir(root):
            raise SnapshotNotFoundError(f"checkpoint {must_exist!r} points to {root!r}, which does not exist")
        ck = Checkpointer(root, storage_options=self.storage_options, no_dist=True, **self._ck_options)
        with self._lock:
            kept = self._cks.setdefault(root, ck)
        if kept is not ck:  # another thread made one first: there must be one only
            ck.close()
        return kept

    @contextlib.contextmanager
    def _open(self, root: str, must_exist: str | None = None) -> Iterator[Checkpointer]:
        """The writer's Checkpointer for its root; for any other root one that lives for this
        call only: this process saves nothing there, and its threads must not outlive a Trainer."""
        with self._lock:
            ck = self._cks.get(root)
        if ck is not None:
            yield ck
            return
        if must_exist is not None and not _is_url(root) and not os.path.isdir(root):
            raise SnapshotNotFoundError(f"checkpoint {must_exist!r} points to {root!r}, which does not exist")
        ck = Checkpointer(root, storage_options=self.storage_options, no_dist=True, **self._ck_options)
        try:
            yield ck
        finally:
            ck.close()

    def _writer(self, path: str) -> tuple[Checkpointer, str]:
        with self._lock:
            if self._writer_root is None:
                self._writer_root = self.root or _root_key(_join(_dirname(path), DEFAULT_ROOT_NAME))
            root = self._writer_root
        ck = self._checkpointer(root)
        with self._lock:
            first = self._next_step is None
        if first:
            # Before any step id is handed out: a claim a crash left behind names a step that
            # this run may save again.
            self._settle_dir(_dirname(path), ck)
            with self._lock:
                if self._next_step is None:
                    self._next_step = (ck.latest() or 0) + 1
        return ck, root

    def _current_body(self, path: str) -> dict[str, Any] | None:
        try:
            return _read_body(path, self.storage_options)
        except PointerError:
            return None  # nothing there yet, or not ours: overwritten either way

    def _settle_dir(self, directory: str, ck: Checkpointer) -> None:
        """Resolve the pending pointers a crashed run left in ``directory`` for this writer's
        root: each becomes the newest committed pointer of its chain, or goes if there is none."""
        for path in _small_files(directory, self.storage_options):
            try:
                body = _read_body(path, self.storage_options)
            except PointerError:
                continue
            if not body.get("pending") or _pointer_of(path, body).root != self._writer_root:
                continue
            kept = next((b for b in _chain(body) if _committed(ck, b)), None)
            with self._path_lock:
                if kept is None:
                    _delete_file(path, self.storage_options)
                else:
                    _write_file(path, _pointer_bytes(_final(kept)), self.storage_options)
            outcome = (
                "removed (it named no committed snapshot)"
                if kept is None
                else f"it names snapshot {kept['step']} again"
            )
            warnings.warn(
                f"fmstore: checkpoint {path!r} was left pending by an interrupted save of snapshot "
                f"{body['step']}; {outcome}",
                stacklevel=3,
            )

    def _commit_job(
        self, handle: SaveHandle, path: str, ck: Checkpointer, claim: dict[str, Any], linked: bool
    ) -> None:
        try:
            handle.wait()  # the commit; raises the save's error
            with self._path_lock:
                with self._lock:
                    newest = self._claims.get(path) is claim
                # A newer save's claim stays: its chain holds this (now committed) pointer.
                if newest:
                    try:
                        _write_file(path, _pointer_bytes(_final(claim)), self.storage_options)
                    except OSError as e:
                        raise FmstoreError(
                            f"snapshot {handle.step} committed, but its checkpoint pointer {path!r} could not be "
                            f"written: {type(e).__name__}: {e}"
                        ) from e
                    with self._lock:
                        del self._claims[path]
        except BaseException:
            with self._lock:
                self._save_failures += 1
            self._rollback(path, claim)
            raise
        # The snapshots this path named before are referenced by nothing else now (each save
        # has its own), unless the path was a link to another pointer.  The whole chain: an
        # older save whose commit failed leaves the pointer before it undropped.
        if linked:
            return
        for old in _chain(claim["previous"]):
            if old["step"] != handle.step and self._same_root(_pointer_of(path, old).root, ck):
                if _committed(ck, old):
                    self._drop(ck, old["step"])

    def _rollback(self, path: str, claim: dict[str, Any]) -> None:
        """A failed save's claim: the path names what it named before, or nothing."""
        with self._path_lock:
            with self._lock:
                if self._claims.get(path) is not claim:
                    return  # a newer save claimed it; its commit settles the path
                del self._claims[path]
            kept = None
            for body in _chain(claim["previous"]):
                with self._open(_pointer_of(path, body).root) as ck:
                    if not body.get("pending") or _committed(ck, body):
                        kept = body
                        break
            try:
                if kept is None:
                    _delete_file(path, self.storage_options)
                else:
                    _write_file(path, _pointer_bytes(_final(kept)), self.storage_options)
            except OSError:
                pass  # the claim stays; loads fall back along its chain, the next writer settles it

    def _same_root(self, root: str, ck: Checkpointer) -> bool:
        with self._lock:
            return self._cks.get(root) is ck

    def _remove_job(self, path: str, told: int) -> None:
        with self._lock:
            failed = self._save_failures > told
        if failed:
            warnings.warn(
                f"fmstore: kept {path!r}: a save queued before its removal failed, so its replacement may not exist",
                stacklevel=2,
            )
            return
        try:
            body = _read_body(path, self.storage_options)
        except PointerNotFoundError:
            return
        except PointerError:  # not ours: remove the file, as TorchCheckpointIO would
            _delete_file(path, self.storage_options)
            return
        linked = _is_link(path)
        _delete_file(path, self.storage_options)  # first: from here on the checkpoint is gone
        if linked:  # only a link: the file it points to keeps its snapshot
            return
        for b in _chain(body):  # a claim a crash left: the snapshots of its chain go too
            pointer = _pointer_of(path, b)
            if not _is_url(pointer.root) and not os.path.isdir(pointer.root):
                continue
            with self._open(pointer.root) as ck:
                if _committed(ck, b):
                    self._drop(ck, pointer.step)

    def _drop(self, ck: Checkpointer, step: int) -> None:
        """Delete snapshot ``step``; files that kept snapshots reference stay (Checkpointer.delete)."""
        if not ck.where(step):
            return
        # A save in flight bases its incremental references on the newest committed snapshot;
        # the snapshots dropped here are older than the one replacing them, but should this be
        # the newest, no save may start until it is gone (ck.delete waits for those in flight).
        if step == ck.latest():
            with self._save_lock:
                ck.delete(step)
        else:
            ck.delete(step)

    def _drain(self, *, raise_errors: bool) -> None:
        self._jobs.wait()
        if raise_errors:
            self._raise_errors()

    def _raise_errors(self) -> None:
        """Raise the oldest error of a finished job not raised yet (the others with it are
        dropped: one failure stops Lightning), and count the failed saves as told."""
        errors = self._jobs.pop_errors()  # first: a save counts as failed before its error is there
        with self._lock:
            self._failures_told = self._save_failures
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"FmstoreCheckpointIO(root={self.root or self._writer_root!r}, block={self.block})"


def load_checkpoint(
    path: Any, map_location: Any | None = None, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read the Lightning checkpoint dict a pointer file names, outside a Trainer (e.g. for
    ``model.load_state_dict(ckpt["state_dict"])``: ``LightningModule.load_from_checkpoint``
    reads files with ``torch.load`` and so cannot open pointers)."""
    io = FmstoreCheckpointIO(storage_options=storage_options)
    try:
        return io.load_checkpoint(path, map_location)
    finally:
        io.teardown()


# ---------------------------------------------------------------------------- the callback


class _TrainerState:
    """What Lightning needs to resume besides modules, optimizers and schedulers: the fit loop's
    progress and data-loader positions, the other callbacks' states, the precision plugin's and
    the datamodule's state.  Saved per rank (each rank's data loader has its own position).

    For a load, ``target`` is the saved structure itself (built from the manifest): plain values
    are not known before the load, and a strict load needs the snapshot's keys."""

    fmstore_per_rank = True

    def __init__(self, trainer: Any, owner: Any, target: Any = None) -> None:
        self.trainer, self.owner, self.target = trainer, owner, target

    def state_dict(self) -> dict[str, Any]:
        if self.target is not None:
            return self.target
        trainer = self.trainer
        callbacks = {}
        for cb in trainer.callbacks:
            if cb is self.owner:
                continue
            sd = cb.state_dict()
            if sd:
                callbacks[cb.state_key] = sd
        out: dict[str, Any] = {
            "fit_loop": trainer.fit_loop.state_dict(),
            "callbacks": callbacks,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "data": self.owner.data_position.position(trainer),
        }
        precision = trainer.precision_plugin.state_dict()
        if precision:
            out["precision"] = precision
        if trainer.datamodule is not None:
            dm = trainer.datamodule.state_dict()
            if dm:
                out["datamodule"] = dm
        return encode_value(out, ("trainer",))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = self.trainer
        state = decode_value(state)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        saved = state.get("callbacks", {})
        for cb in trainer.callbacks:
            if cb is not self.owner and cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
        if "precision" in state:
            trainer.precision_plugin.load_state_dict(state["precision"])
        if "datamodule" in state and trainer.datamodule is not None:
            trainer.datamodule.load_state_dict(state["datamodule"])
        if state.get("data"):  # snapshots written before fmstore kept the data position have none
            self.owner.data_position.load_state_dict(state["data"])


def _saved_subtree(manifest: Manifest, key: str, rank: int) -> Any:
    """The structure saved under ``key`` (a per-rank Stateful) for ``rank``, its tensors empty."""
    have = manifest.saved_ranks((key,))
    if have is None or rank not in have:
        raise LoadMismatchError(
            f"snapshot step {manifest.step} has no {key!r} state for rank {rank} (saved by ranks {have or []}); "
            "resume with the world size it was saved with"
        )

    def empty(name: str) -> torch.Tensor:
        entry = manifest.tensors[name]
        return torch.empty(entry.shape, dtype=entry.torch_dtype)

    return manifest.state((key,), rank, tensor=empty)


class FmstoreCheckpoint(Checkpoint):
    """Checkpoint a Lightning run with fmstore on fmstore's schedule, on any strategy, and resume it.

    ``Trainer(callbacks=[FmstoreCheckpoint("s3://bucket/run1", every_n_train_steps=100)])``.

    Every ``every_n_train_steps`` optimizer steps (at the end of that batch) every rank calls
    ``Checkpointer.save(global_step, state)`` with the LightningModule, its optimizers and LR
    schedulers as Stateful values (so FSDP2 / tensor-parallel DTensor shards are written by their
    own ranks, without gathering), ``fmstore.RNGState()`` and, per rank, what Lightning needs to
    resume (the fit loop's progress and data-loader states, the other callbacks' states, the
    precision plugin's and the datamodule's state, epoch and global step).  The snapshot step is
    the global step.  ``policy`` spreads snapshots over levels: e.g. ``every_n_train_steps=1`` with
    ``Policy(host_memory=1, every=50, levels=[Level("s3://...", every=500)])`` keeps every step in
    host memory, every 50th on local disk and every 500th in object storage.  With
    ``save_on_train_end`` the last step (``max_steps``, or the last batch of ``max_epochs``) is
    saved to every level; a stop Lightning decides later (``EarlyStopping``), right after a save
    kept in host memory only, is warned about (that step cannot be saved twice).

    Resume (``resume=True`` and a committed snapshot under ``root``): in ``on_fit_start``, which
    ``Trainer._run`` calls after ``strategy.setup()`` (so the model is wrapped, sharded and on its
    device and the optimizers and schedulers exist, the objects filled in place) and before
    ``_run_stage()`` starts the fit loop (whose ``setup_data``/``reset`` read the restored loop
    state and hand the data loaders their positions), everything above is restored in place
    (at Lightning's own ``restore_training_state`` point, which comes later, there would be no
    hook of ours).  Training then continues bit-exact.  Do not also pass ``fit(ckpt_path=...)``:
    Lightning would restore that afterwards, over this.  Uncommitted step directories newer than
    the latest snapshot (a save the crash interrupted) are removed first, so their files cannot
    be mistaken for the new save's.  The state is captured at this callback's
    ``on_train_batch_end``, which Lightning runs after the other (non-checkpoint) callbacks';
    the LightningModule's own ``on_train_batch_end`` and ``on_save_checkpoint`` hooks run
    after/outside it.  Lightning checkpoint files are not written by this callback.

    ``block=False`` (default) lets parameter and optimizer-state copies overlap the next
    forward/backward (the next ``optimizer.step()`` waits for them).
    """

    #: Lightning's ``ckpt_path="best"`` reads this from the first checkpoint callback; fmstore
    #: snapshots are not Lightning checkpoint files.
    best_model_path = ""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        every_n_train_steps: int,
        policy: Policy | None = None,
        keep_last: int | None = None,
        compression: Any = None,
        block: bool = False,
        resume: bool = True,
        storage_options: dict[str, Any] | None = None,
        codec: str = "auto",
        save_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        if (
            not isinstance(every_n_train_steps, int)
            or isinstance(every_n_train_steps, bool)
            or every_n_train_steps < 1
        ):
            raise ConfigError(f"every_n_train_steps must be an int >= 1, got {every_n_train_steps!r}")
        _check_options(compression, codec)
        self.root = os.fspath(root)
        self.every_n_train_steps = every_n_train_steps
        self.block = block
        self.resume = resume
        self.save_on_train_end = save_on_train_end
        self._ck_options: dict[str, Any] = dict(
            storage_options=storage_options,
            policy=policy,
            keep_last=keep_last,
            compression=compression,
            codec=codec,
        )
        self.checkpointer: Checkpointer | None = None
        self.resumed_step: int | None = None  # the snapshot the last fit resumed from
        self.last_handle: SaveHandle | None = None
        self._saved_step: int | None = None
        self._position = _DataPosition()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(root=self.root)

    @property
    def data_position(self) -> _DataPosition:
        """Where the training data stood at the last save, and what the last resume skipped
        (``skipped`` batches in ``skip_seconds``)."""
        return self._position

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing of ours belongs in a Lightning checkpoint file

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            # FSDP1's flat parameters are neither whole tensors nor DTensors, and DeepSpeed's
            # engine owns its state: neither can be saved shard by shard from the module.
            raise ConfigError(
                f"FmstoreCheckpoint does not support {type(trainer.strategy).__name__}; use "
                "ModelParallelStrategy (FSDP2 fully_shard / tensor parallel: DTensor parameters), or "
                "FmstoreCheckpointIO with full state dicts"
            )
        if stage == "fit" and self.checkpointer is None:
            # After strategy.setup_environment(): torch.distributed is up, every rank saves.
            self.checkpointer = Checkpointer(self.root, **self._ck_options)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ck = self._ck()
        if trainer.is_global_zero:
            _discard_unfinished(ck)
        trainer.strategy.barrier("FmstoreCheckpoint.on_fit_start")
        self._saved_step = None
        if not self.resume:
            return
        step = trainer.strategy.broadcast(ck.latest())
        if step is None:
            return
        target = _saved_subtree(ck.manifest(step), "trainer", ck.rank)
        ck.load(self._state(trainer, pl_module, _TrainerState(trainer, self, target)), step=step)
        self.resumed_step = self._saved_step = step
        rank_zero_info(f"FmstoreCheckpoint: resumed from snapshot step {step} under {self.root!r}")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._position.on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._position.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Once per optimizer step (with gradient accumulation several batches share one): the
        # first batch end that sees the step is the one right after it, with no partial grads.
        if step > 0 and step % self.every_n_train_steps == 0 and step != self._saved_step:
            # The last step goes to every level now: once kept in host memory only, the same
            # step could not be saved again at on_train_end (snapshots are never overwritten).
            last = self.save_on_train_end and _ends_here(trainer)
            self._save(trainer, pl_module, step, levels="all" if last else None)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if not self.save_on_train_end or step == 0:
            return
        if step != self._saved_step:
            self._save(trainer, pl_module, step, levels="all")
        elif self.last_handle is not None and self.last_handle.wait().levels == ["host"]:
            rank_zero_warn(
                f"FmstoreCheckpoint: training stopped early at step {step}, whose snapshot is kept in host "
                "memory only; it ends with the process (the newest durable one is older)"
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.checkpointer is not None:
            ck, self.checkpointer = self.checkpointer, None
            ck.close()  # waits for the commits in flight, raises a failed one

    # ------------------------------------------------------------------ helpers

    def _ck(self) -> Checkpointer:
        if self.checkpointer is None:
            raise FmstoreError("FmstoreCheckpoint is used outside Trainer.fit (its setup hook did not run)")
        return self.checkpointer

    def _save(self, trainer: Any, pl_module: Any, step: int, levels: str | None = None) -> None:
        state = self._state(trainer, pl_module, _TrainerState(trainer, self))
        self.last_handle = self._ck().save(
            step,
            state,
            block=self.block,
            levels=levels,
            meta={"lightning": {"global_step": step, "epoch": trainer.current_epoch}},
        )
        self._saved_step = step

    def _state(self, trainer: Any, pl_module: Any, trainer_state: _TrainerState) -> dict[str, Any]:
        # The module itself: fmstore saves DTensor modules (FSDP2, TP) and their optimizers
        # through torch DCP's state_dict functions, shard by shard; others as they are.
        return {
            "model": pl_module,
            "optimizers": list(trainer.optimizers),
            "lr_schedulers": [config.scheduler for config in trainer.lr_scheduler_configs],
            "rng": RNGState(),
            "trainer": trainer_state,
        }


def _ends_here(trainer: Any) -> bool:
    """Whether the fit loop stops after this batch (max_steps, or the last batch of max_epochs)."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    return bool(last_batch and max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs)


def _discard_unfinished(ck: Checkpointer) -> None:
    """Remove step directories newer than each level's latest commit: saves a crash interrupted.

    Under several ranks a rerun saving the same step again would otherwise find the dead
    attempt's per-rank reports next to its own.  Older uncommitted directories may hold files
    that committed snapshots reference, and stay.  Call before any save of this run.
    """
    for lvl in ck.levels:
        lvl.snapshots.discard_unfinished()
