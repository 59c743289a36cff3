"""PyTorch Lightning (2.5+) integration: fmstore snapshots behind Lightning's checkpoint API.

Two ways in, for two kinds of job:

* :class:`FmstoreCheckpointIO` -- ``Trainer(plugins=[FmstoreCheckpointIO()])``.  Lightning's
  own ``ModelCheckpoint`` (top-k, ``last``, ``-v1`` counters, ``fit(ckpt_path="last")``) keeps
  deciding *what* to save and remove; each save becomes an async, incremental fmstore snapshot,
  and the file Lightning names becomes a small JSON **pointer** to it, written only once the
  snapshot has committed.  For strategies whose checkpoint state is whole on global rank 0
  (single device, DDP, FSDP with full state dicts).
* :class:`FmstoreCheckpoint` -- a callback that checkpoints on fmstore's own schedule (every k
  steps, a :class:`fmstore.Policy` for host memory / local / object storage) on any strategy:
  every rank saves its own shards (FSDP2, tensor parallel), and a rerun resumes bit-exact.

What the peers get wrong, and what is done here instead:

* Lightning's ``AsyncCheckpointIO`` wrote tensors that training was still changing, so one
  checkpoint could mix two steps (Lightning #20953); its fix clones the whole checkpoint on the
  training thread (#21079), a second full copy in memory and time.  Here the copy goes once, into
  fmstore's (pinned) buffer pool; with ``block=False`` parameter and optimizer-state copies run
  under the next forward/backward, and fmstore's optimizer step pre-hook
  (:mod:`fmstore.checkpoint.overlap`) makes the next ``optimizer.step()`` wait for them, so every
  snapshot holds exactly the weights of its step.
* ``AsyncCheckpointIO`` runs ``remove_checkpoint`` at once, while the save of its replacement is
  still in flight: a crash then leaves neither.  Here removals go through the same ordered queue
  as commits (see below), so a removal never precedes the commit of the checkpoint that replaces
  it, and ``Checkpointer.delete`` never deletes bytes that a kept snapshot references.
* With sharded strategies (``FSDPStrategy(state_dict_type="sharded")``, ``ModelParallelStrategy``)
  Lightning writes a torch DCP directory itself and never calls the CheckpointIO (#20205), so a
  CheckpointIO plugin cannot see sharded state at all.  :class:`FmstoreCheckpoint` saves from a
  callback on every rank instead, DTensor shards included.

Pointer file (the file at the path Lightning names; UTF-8 JSON, one object)::

    {"format": "fmstore.lightning-pointer", "version": 1, "root": ".fmstore", "step": 12,
     "global_step": 10, "epoch": 0}

``root`` is the snapshot root: relative to the pointer's directory when it lies inside it
(so a checkpoint directory can be moved or copied whole), else an absolute path or a URL;
``step`` is the fmstore snapshot id.  ``global_step``/``epoch`` are informational.  Pointers are
written crash-safely: local files by temp + fsync + rename (``last.ckpt`` is replaced
atomically), URLs by one PUT.  Loading never unpickles anything: a path that is not a pointer
is refused with :class:`PointerError`.

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
import json
import os
import pathlib
import posixpath
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fmstore.integrations import require

require("lightning", "lightning", by=__name__)
from lightning.fabric.utilities.data import AttributeDict  # noqa: E402 - after require() names the extra
from lightning.pytorch.callbacks import Checkpoint  # noqa: E402 - after require() names the extra
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402 - after require() names the extra
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn  # noqa: E402 - after require() names the extra

from fmstore import exiting
from fmstore.blob import dtype_from_name
from fmstore.checkpoint import (
    Checkpointer,
    LoadMismatchError,
    Manifest,
    Policy,
    RNGState,
    SaveHandle,
    SnapshotNotFoundError,
    UnsupportedValueError,
    overlap,
)
from fmstore.checkpoint.checkpointer import CODECS, COMPRESSION
from fmstore.checkpoint.manifest import parse_step_dir
from fmstore.checkpoint.tree import tensor_leaves, unflatten
from fmstore.errors import ConfigError, FmstoreError
from fmstore.tiers.files import write_atomic
from fmstore.tiers.object import open_fs

__all__ = [
    "FmstoreCheckpointIO",
    "FmstoreCheckpoint",
    "PointerError",
    "PointerNotFoundError",
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


class PointerError(FmstoreError, ValueError):
    """A checkpoint path that is not a readable fmstore pointer file; the message names it."""


class PointerNotFoundError(PointerError, FileNotFoundError):
    """No file at a checkpoint path."""


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


def _pointer_bytes(root: str, pointer_path: str, step: int, global_step: Any, epoch: Any) -> bytes:
    body = {
        "format": POINTER_FORMAT,
        "version": POINTER_VERSION,
        "root": _root_text(root, _root_key(_dirname(pointer_path))),  # where the file will lie
        "step": step,
        "global_step": global_step if isinstance(global_step, int) else None,
        "epoch": epoch if isinstance(epoch, int) else None,
    }
    return (json.dumps(body, indent=1) + "\n").encode()


def _write_file(path: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    """Crash-safe: the old file or the whole new one (local: temp + fsync + rename; URL: one PUT)."""
    if _is_url(path):
        fs, p = open_fs(path, storage_options)
        fs.pipe_file(p, data)
    else:
        write_atomic(path, [data])


def _delete_file(path: str, storage_options: dict[str, Any] | None) -> None:
    try:
        if _is_url(path):
            fs, p = open_fs(path, storage_options)
            fs.rm_file(p)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _is_link(path: str) -> bool:
    return not _is_url(path) and os.path.islink(path)


def read_pointer(path: Any, storage_options: dict[str, Any] | None = None) -> Pointer:
    """The pointer at ``path``; :class:`PointerError` (naming it) if it is anything else."""
    path = _location(path)
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
    version, step, root = body.get("version"), body.get("step"), body.get("root")
    if not isinstance(version, int) or version > POINTER_VERSION:
        raise PointerError(
            f"{path!r}: pointer version {version!r}; this fmstore reads up to {POINTER_VERSION}"
        )
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PointerError(f"{path!r}: pointer step must be an int >= 0, got {step!r}")
    if not isinstance(root, str) or not root:
        raise PointerError(f"{path!r}: pointer root must be a non-empty string, got {root!r}")
    return Pointer(
        path, _resolve_root(root, _real_dirname(path)), step, body.get("global_step"), body.get("epoch")
    )


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


# ---------------------------------------------------------------------------- the CheckpointIO


def _check_options(compression: Any, codec: str) -> None:
    if compression not in COMPRESSION:
        raise ConfigError(f"compression must be one of {sorted(COMPRESSION, key=str)}, got {compression!r}")
    if codec not in CODECS:
        raise ConfigError(f"codec must be one of {list(CODECS)}, got {codec!r}")


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
    Pointers appear once their snapshot commits, so a name that ModelCheckpoint checks for
    existence (version counters) right after saving it may not exist yet; names holding
    ``{step}`` (the default) never collide.  A process that exits without ``teardown`` still gets
    its pointers written (:mod:`fmstore.exiting`).  A crash between a commit and its pointer, or
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
        overlap.install()
        self._lock = threading.Lock()  # the fields below
        self._save_lock = threading.Lock()  # a save vs. deleting the newest committed snapshot
        self._cks: dict[str, Checkpointer] = {}
        self._writer_root: str | None = None
        self._next_step: int | None = None
        self._queue: ThreadPoolExecutor | None = None
        self._jobs: list[Future[None]] = []
        self._errors: list[BaseException] = []
        self._save_failures = 0  # saves whose commit or pointer failed (job thread)
        self._failures_told = 0  # how many of them the caller had been told of
        exiting.register(self)

    # Lightning's ddp_spawn pickles the trainer with its plugins: only the configuration travels.
    def __getstate__(self) -> dict[str, Any]:
        if any(not f.done() for f in self._jobs):
            raise FmstoreError("FmstoreCheckpointIO has saves in flight; call teardown() before pickling it")
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
        """Snapshot ``checkpoint``; the pointer at ``path`` is written once the snapshot commits."""
        if storage_options is not None:
            raise ConfigError(
                f"FmstoreCheckpointIO takes no per-save storage_options (got {storage_options!r} for {path!r}); "
                "pass storage_options=... to FmstoreCheckpointIO(...)"
            )
        self._raise_errors()
        path = _location(path)
        state = encode_value(checkpoint)
        ck, root = self._writer(path)
        meta = {
            "lightning": {
                "path": path,
                "global_step": checkpoint.get("global_step"),
                "epoch": checkpoint.get("epoch"),
                "version": checkpoint.get("pytorch-lightning_version"),
            }
        }
        with self._save_lock:
            with self._lock:
                assert self._next_step is not None
                step = self._next_step
                self._next_step += 1
            handle = ck.save(step, state, block=self.block, meta=meta)
        body = _pointer_bytes(root, path, step, checkpoint.get("global_step"), checkpoint.get("epoch"))
        self._submit(self._commit_job, handle, path, ck, body)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict the pointer at ``path`` names.  Tensors land on ``map_location``
        when it is a device or a device string, else on the CPU.  ``weights_only`` changes
        nothing: nothing is unpickled, ever."""
        self._drain(raise_errors=True)
        pointer = read_pointer(path, self.storage_options)
        ck = self._checkpointer(pointer.root, must_exist=pointer.path)
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        try:
            state = ck.load(step=pointer.step, device=device)
        except SnapshotNotFoundError as e:
            raise SnapshotNotFoundError(
                f"checkpoint {pointer.path!r} points to a missing snapshot: {e}"
            ) from None
        return decode_value(state)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the pointer at ``path`` and its snapshot, after every save queued before it has
        committed (in the background)."""
        self._raise_errors()
        with self._lock:
            told = self._failures_told
        self._submit(self._remove_job, _location(path), told)

    def teardown(self) -> None:
        """Wait for every queued commit, pointer and removal; free the checkpointers' memory and
        threads (they come back on the next use); raise the first error not yet raised."""
        try:
            self._drain(raise_errors=True)
        finally:
            with self._lock:
                cks, self._cks = list(self._cks.values()), {}
                queue, self._queue = self._queue, None
                self._writer_root, self._next_step = None, None
            if queue is not None:
                queue.shutdown(wait=True)
            for ck in cks:
                ck.close()

    # ------------------------------------------------------------------ helpers

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

    def _writer(self, path: str) -> tuple[Checkpointer, str]:
        with self._lock:
            if self._writer_root is None:
                self._writer_root = self.root or _root_key(_join(_dirname(path), DEFAULT_ROOT_NAME))
            root = self._writer_root
        ck = self._checkpointer(root)
        with self._lock:
            if self._next_step is None:
                self._next_step = (ck.latest() or 0) + 1
        return ck, root

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._queue is None:
                self._queue = ThreadPoolExecutor(1, thread_name_prefix="fmstore-lightning")
            self._jobs = [f for f in self._jobs if not f.done()]
            self._jobs.append(self._queue.submit(self._run_job, fn, *args))

    def _run_job(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by _raise_errors
            with self._lock:
                self._errors.append(e)

    def _commit_job(self, handle: SaveHandle, path: str, ck: Checkpointer, body: bytes) -> None:
        try:
            handle.wait()  # the commit; raises the save's error
            try:
                old = read_pointer(path, self.storage_options)
            except PointerError:
                old = None  # nothing there yet, or not ours: overwritten either way
            linked = _is_link(path)  # save_last="link" left a symlink: replace it, keep its target
            try:
                _write_file(path, body, self.storage_options)
            except OSError as e:
                raise FmstoreError(
                    f"snapshot {handle.step} committed, but its checkpoint pointer {path!r} could not be "
                    f"written: {type(e).__name__}: {e}"
                ) from e
        except BaseException:
            with self._lock:
                self._save_failures += 1
            raise
        # The snapshot this path named before is referenced by nothing else now (each save has
        # its own), unless the path was a link to another pointer.
        if old is not None and not linked and old.step != handle.step and self._same_root(old.root, ck):
            self._drop(ck, old.step)

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
            pointer = read_pointer(path, self.storage_options)
        except PointerNotFoundError:
            return
        except PointerError:  # not ours: remove the file, as TorchCheckpointIO would
            _delete_file(path, self.storage_options)
            return
        linked = _is_link(path)
        _delete_file(path, self.storage_options)  # first: from here on the checkpoint is gone
        if linked:  # only a link: the file it points to keeps its snapshot
            return
        if not _is_url(pointer.root) and not os.path.isdir(pointer.root):
            return
        self._drop(self._checkpointer(pointer.root), pointer.step)

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
        with self._lock:
            jobs = list(self._jobs)
        wait_futures(jobs)
        if raise_errors:
            self._raise_errors()

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
            self._failures_told = self._save_failures
        if errors:
            raise errors[0]

    # fmstore.exiting: pointers of saves in flight at interpreter exit are still written.
    def _exit_pending(self) -> str | None:
        with self._lock:
            n = sum(not f.done() for f in self._jobs)
        return f"{n} queued Lightning checkpoint commit(s)/removal(s)" if n else None

    def _exit_wait(self, timeout: float | None) -> bool:
        with self._lock:
            jobs = list(self._jobs)
        _, not_done = wait_futures(jobs, timeout=timeout)
        if not_done:
            return False
        self._raise_errors()
        return True

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


def _saved_subtree(manifest: Manifest, key: str, rank: int) -> Any:
    """The structure saved under ``key`` (a per-rank Stateful) for ``rank``, its tensors empty."""
    tree = manifest.tree
    node = next((v for k, v in tree.get("items", []) if k == key), None) if tree.get("t") == "dict" else None
    sub = node["ranks"].get(str(rank)) if node is not None and node.get("t") == "per_rank" else None
    if sub is None:
        have = sorted(node["ranks"]) if node is not None and node.get("t") == "per_rank" else []
        raise LoadMismatchError(
            f"snapshot step {manifest.step} has no {key!r} state for rank {rank} (saved by ranks {have}); "
            "resume with the world size it was saved with"
        )
    tensors = {
        name: torch.empty(manifest.tensors[name].shape, dtype=dtype_from_name(manifest.tensors[name].dtype))
        for name in tensor_leaves(sub, rank).values()
    }
    return unflatten(sub, tensors, rank)


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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(root=self.root)

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
        committed = lvl.steps()
        newest = committed[-1] if committed else -1
        for name in lvl.storage.list_dir():
            step = parse_step_dir(name)
            if step is not None and step > newest:
                lvl.storage.delete_dir(name)
