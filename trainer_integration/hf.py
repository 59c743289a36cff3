"""Hugging Face ``Trainer`` checkpoints through fmstore: async, atomic, resumed bit-exact.

    from fmstore.integrations.hf import FmstoreCallback

    callback = FmstoreCallback("ckpts/run1", keep_last=3)       # or "s3://bucket/run1"
    trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume(trainer))  # None on a fresh start

**Saving.**  When the Trainer decides to save (``control.should_save``, set by its flow
callback on ``save_steps`` or at an epoch's end), the callback snapshots the model, the torch
optimizer (unwrapped from accelerate's), the LR scheduler, the grad scaler if one is enabled,
the random number generators of each rank (:class:`fmstore.RNGState`) and the ``TrainerState``
(as JSON) as step ``global_step``, and vetoes the save (``control.should_save = False``): the
Trainer writes no ``checkpoint-N`` folder of its own.  The snapshot is taken at the last
callback before the Trainer's own save point (after that step's log and evaluation: an
evaluation draws from the RNG), so it holds what the Trainer would have saved.  Saves are
``block=False`` by default: the copy of weights and optimizer state runs under the next
forward and backward pass, and the next ``optimizer.step()`` waits for it.  Under DDP every
rank saves (replicated tensors are written once, the RNG per rank); a snapshot exists only once
its ``manifest.json`` is committed.

**Resuming.**  :meth:`FmstoreCallback.resume` returns None when nothing is committed, else a
small local folder holding only ``trainer_state.json`` (JSON, from the snapshot's manifest), to
pass as ``resume_from_checkpoint``.  The Trainer reads it for the epoch and step to continue
from and skips the batches already trained on with its own data skipping, so the data order is
exactly the uninterrupted run's.  ``resume`` also points that trainer's loaders
(``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler``,
``_load_rng_state``) at the snapshot: weights, optimizer, scheduler and scaler are filled in
place by one strict, checksummed read once the optimizer and scheduler exist (the point of the
Trainer's own ``_load_optimizer_and_scheduler``; nothing reads the weights before it), and each
rank's generators are set where the Trainer sets its own, right before the first resumed batch.
Nothing pickled is read: tensors come from safetensors shard files, the rest is JSON.

Peers' failures this avoids: the Trainer resumes from the highest ``checkpoint-N`` folder even
when its writer died half-way (transformers #35525), and its atomic-save attempt was reverted
(#36112).  Here ``resume`` takes the newest *committed* step; a snapshot killed mid-write has
no manifest and does not exist.

Not supported (a :class:`fmstore.ConfigError` says so): DeepSpeed, ``save_strategy="best"``
and ``load_best_model_at_end`` (the Trainer decides and reads those through its own folders).
``push_to_hub`` acts on folders that are no longer written; use a ``Policy`` level (e.g.
``s3://``) instead.  ``on_save`` is not called.  ``save_total_limit=N`` is honoured: it is the
callback's ``keep_last`` (the newest N committed snapshots stay); set both only to the same N
(a :class:`fmstore.ConfigError` names the two otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fmstore.integrations import require

transformers = require("transformers", "hf", by=__name__)
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402

from fmstore import Checkpointer, ConfigError, Policy, RNGState
from fmstore.checkpoint import HOST, LoadMismatchError, SaveHandle, watch_optimizer_steps
from fmstore.storage import remove_local, write_atomic

__all__ = ["FmstoreCallback", "TRAINER_STATE_NAME", "LOADERS"]

#: The file ``Trainer.train(resume_from_checkpoint=...)`` reads the TrainerState from.
TRAINER_STATE_NAME = "trainer_state.json"
#: The Trainer's methods that :meth:`FmstoreCallback.resume` points at the snapshot.
LOADERS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler", "_load_rng_state")
#: The key of each part in a snapshot's state.
MODEL, OPTIMIZER, SCHEDULER, SCALER, RNG, TRAINER_STATE = (
    "model",
    "optimizer",
    "lr_scheduler",
    "scaler",
    "rng",
    "trainer_state",
)


class _HeldRNG(RNGState):
    """The generators' load target: filled like :class:`RNGState`, but set only when the Trainer
    would set its own (``_load_rng_state``, right before the first resumed batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, Any] | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


@dataclass
class _Resume:
    """A resume in progress: the step, the folder handed to the Trainer, the RNG it waits for."""

    step: int
    folder: str
    trainer_state: dict[str, Any]
    rng: dict[str, Any] | None = None
    loaded: bool = False  # the Trainer called _load_optimizer_and_scheduler


class FmstoreCallback(TrainerCallback):
    """Takes over the Trainer's checkpoints: saves through a :class:`fmstore.Checkpointer` and
    vetoes the Trainer's own; :meth:`resume` restores a run bit-exact (see the module doc).

    Parameters:
        root: a directory or fsspec URL (``s3://bucket/run1``) for the snapshots.
        storage_options: passed to fsspec untouched (credentials, endpoint).
        policy: a :class:`fmstore.Policy` (host-memory copies, further levels such as S3).
        keep_last: keep only the newest N committed snapshots in ``root``.
        compression: None (raw) or ``"lossless"``.
        block: wait for the device-to-host copy in the save instead of overlapping it with the
            next forward and backward pass.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        policy: Policy | None = None,
        keep_last: int | None = None,
        compression: str | None = None,
        block: bool = False,
    ) -> None:
        self.root = root
        self.block = block
        self._options: dict[str, Any] = {
            "storage_options": storage_options,
            "policy": policy,
            "keep_last": keep_last,
            "compression": compression,
        }
        self._ck: Checkpointer | None = None
        self._trainer: Any = None
        self._resume: _Resume | None = None
        # A save the Trainer asked for, to be taken at the callback named here (the last one
        # before the Trainer's own save point), or at the next event whichever comes first.
        self._pending: str | None = None
        self._saved_step: int | None = None
        self.last_save: SaveHandle | None = None  # the handle of the latest save
        # Seen stepping from now on, the optimizer's tensors can be copied under the next step.
        watch_optimizer_steps()

    # ------------------------------------------------------------------ public

    @property
    def checkpointer(self) -> Checkpointer:
        """The :class:`fmstore.Checkpointer` behind the callback (made on first use, once
        ``torch.distributed`` is set up by the Trainer's arguments)."""
        if self._ck is None:
            self._ck = Checkpointer(self.root, **self._options)
        return self._ck

    def resume(self, trainer: Any) -> str | None:
        """What to pass as ``trainer.train(resume_from_checkpoint=...)``: None if nothing is
        committed under ``root`` (a fresh start), else a folder holding only the snapshot's
        ``trainer_state.json``, with ``trainer``'s loaders pointed at the newest committed
        snapshot (until training ends).  Call it on every rank, on a fresh start too: it binds
        the callback to ``trainer`` (added if missing), whose ``total_flos`` and stateful
        callbacks the snapshots then record as the Trainer's own checkpoints do."""
        self._bind(trainer)
        self._check_args(trainer.args, trainer)
        missing = [name for name in LOADERS if not callable(getattr(trainer, name, None))]
        if missing:
            raise ConfigError(
                f"transformers {transformers.__version__}: {type(trainer).__name__} has no {missing}; "
                "FmstoreCallback.resume replaces these Trainer methods (written for transformers 5)"
            )
        step = self.checkpointer.latest()
        if step is None:
            return None
        trainer_state = self._trainer_state_of(step)
        folder = tempfile.mkdtemp(prefix=f"fmstore-resume-{step}-")
        write_atomic(os.path.join(folder, TRAINER_STATE_NAME), [_trainer_state_file(trainer_state)])
        self._resume = _Resume(step, folder, trainer_state)
        loaders: dict[str, Callable[..., None]] = {
            "_load_from_checkpoint": self._load_model,
            "_load_optimizer_and_scheduler": self._load_snapshot,
            "_load_scaler": self._load_scaler,
            "_load_rng_state": self._load_rng,
        }
        for name, fn in loaders.items():  # on the instance: other trainers keep their own
            setattr(trainer, name, fn)
        return folder

    def wait(self) -> None:
        """Wait until every save in flight is committed (raises a save's error)."""
        if self._ck is not None:
            self._ck.wait()

    def close(self) -> None:
        """Wait for the saves in flight and free the checkpointer's memory and threads."""
        if self._ck is not None:
            self._ck.close()
            self._ck = None

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._check_args(args)
        if self._resume is not None and not self._resume.loaded:  # no step may train on fresh weights
            raise ConfigError(
                f"transformers {transformers.__version__}: the Trainer resumed from {self._resume.folder!r} "
                "without calling _load_optimizer_and_scheduler, where FmstoreCallback restores the snapshot "
                f"of step {self._resume.step}"
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._take_over(state, control, kw)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._take_over(state, control, kw)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._pending == "log":
            self._save(state, control, kw)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._pending == "evaluate":
            self._save(state, control, kw)

    # Fallbacks for a save left pending: at an epoch's end the Trainer skips a log with nothing
    # new in it (no on_log), and nothing changes the state before the next epoch begins or
    # training ends.  At a step's end on_log always follows, unless a later callback cleared
    # should_log: then the save comes at the next step's beginning, after its batches are fetched.
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._pending is not None:
            self._save(state, control, kw)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._pending is not None:
            self._save(state, control, kw)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        try:
            if self._pending is not None:
                self._save(state, control, kw)
            self.wait()  # train() returns with its last snapshot committed (or its error raised)
        finally:
            self._end_resume()

    # ------------------------------------------------------------------ saving

    def _take_over(self, state: TrainerState, control: TrainerControl, kw: dict[str, Any]) -> None:
        if not control.should_save:
            return
        control.should_save = False  # the veto: the Trainer writes no checkpoint-N folder
        # The Trainer's own save comes after this step's log and evaluation (which draws from
        # the RNG): the snapshot is taken at the last callback before it.
        self._pending = "evaluate" if control.should_evaluate else "log" if control.should_log else "now"
        if self._pending == "now":
            self._save(state, control, kw)

    def _save(self, state: TrainerState, control: TrainerControl, kw: dict[str, Any]) -> None:
        self._pending = None
        if state.global_step in (self._saved_step, self._resume.step if self._resume else None):
            return  # asked twice for one step (committed steps are never overwritten)
        optimizer = kw.get("optimizer")
        model, scheduler = kw.get("model"), kw.get("lr_scheduler")
        if model is None or optimizer is None or scheduler is None:
            raise ConfigError(
                f"step {state.global_step}: the Trainer passed no model, optimizer or LR scheduler to "
                "FmstoreCallback; it can only checkpoint a training run"
            )
        if self._trainer is not None:
            self._trainer.store_flos()  # as the Trainer's _save_checkpoint does: total_flos up to date
        parts = self._parts(model, optimizer, scheduler, self._trainer_state(state, control), RNGState())
        self.last_save = self.checkpointer.save(state.global_step, parts, block=self.block)
        self._saved_step = state.global_step

    def _trainer_state(self, state: TrainerState, control: TrainerControl) -> dict[str, Any]:
        """The TrainerState as JSON, with the stateful callbacks' current state, as the Trainer's
        ``_save_checkpoint`` writes it (its folder's ``trainer_state.json``)."""
        callbacks = list(self._trainer.callback_handler.callbacks) if self._trainer is not None else []
        exportable = [cb for cb in [*callbacks, control] if isinstance(cb, ExportableState)]
        exported = dataclasses.replace(state, stateful_callbacks=exportable)  # their state() now
        return json.loads(json.dumps(dataclasses.asdict(exported)))

    @staticmethod
    def _parts(
        model: Any, optimizer: Any, scheduler: Any, trainer_state: Any, rng: RNGState
    ) -> dict[str, Any]:
        """A snapshot's state: the same keys on save and on load (the load is strict)."""
        parts: dict[str, Any] = {
            MODEL: model,
            OPTIMIZER: _torch_optimizer(optimizer),
            SCHEDULER: _torch_scheduler(scheduler),
            RNG: rng,
            TRAINER_STATE: trainer_state,
        }
        scaler = getattr(optimizer, "scaler", None)  # accelerate's optimizer holds the Trainer's scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            parts[SCALER] = scaler
        return parts

    # ------------------------------------------------------------------ resuming

    def _bind(self, trainer: Any) -> None:
        self._trainer = trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)

    def _check_args(self, args: TrainingArguments, trainer: Any = None) -> None:
        if args.save_strategy == "best" or args.load_best_model_at_end:
            raise ConfigError(
                "FmstoreCallback does not support save_strategy='best' or load_best_model_at_end: the "
                "Trainer decides and reloads those through checkpoint folders it would write itself"
            )
        self._take_save_total_limit(args)
        if getattr(args, "deepspeed", None) or getattr(
            trainer or self._trainer, "is_deepspeed_enabled", False
        ):
            raise ConfigError(
                "FmstoreCallback does not checkpoint DeepSpeed engines (they save their own state)"
            )

    def _take_save_total_limit(self, args: TrainingArguments) -> None:
        """``save_total_limit`` becomes ``keep_last``: the Trainer's own rotation would act on
        folders it no longer writes, so ignoring it would keep every snapshot without a word."""
        limit = getattr(args, "save_total_limit", None)
        if limit is None:
            return
        keep = self._options["keep_last"]
        if keep is not None and keep != limit:
            raise ConfigError(
                f"FmstoreCallback({self.root!r}) has keep_last={keep} and the TrainingArguments "
                f"save_total_limit={limit}: both say how many snapshots stay; give one, or the same N"
            )
        if keep is None and self._ck is not None:  # made before the Trainer's arguments were seen
            raise ConfigError(
                f"FmstoreCallback({self.root!r}): save_total_limit={limit} arrived after its "
                f"checkpointer was made without keep_last; pass keep_last={limit} to FmstoreCallback"
            )
        self._options["keep_last"] = limit

    def _trainer_state_of(self, step: int) -> dict[str, Any]:
        """The TrainerState JSON of snapshot ``step``, from its manifest (no tensor is read)."""
        ck = self.checkpointer
        durable = [lvl for lvl in ck.level_names() if lvl != HOST and step in ck.steps(lvl)]
        if durable:
            manifest = ck.manifest(step, level=durable[0])
            try:
                value = manifest.state((TRAINER_STATE,))
            except KeyError:  # nothing saved under the key
                value = None
        else:  # only in this process's host memory (a second train() in the same process)
            value = ck.load(step=step, level=HOST).get(TRAINER_STATE)
        if not isinstance(value, dict) or value.get("global_step") != step:
            raise LoadMismatchError(
                f"snapshot step {step} under {self.root!r} holds no TrainerState for step {step} "
                f"(key {TRAINER_STATE!r}): it was not saved by FmstoreCallback"
            )
        return value

    def _load_model(self, resume_from_checkpoint: str | None, model: Any = None) -> None:
        """The Trainer's ``_load_from_checkpoint``: the weights are read with the optimizer (one
        strict read, in place) in :meth:`_load_snapshot`, which the Trainer calls before any
        forward pass; the optimizer does not exist yet at this point."""

    def _load_snapshot(self, checkpoint: str | None) -> None:
        """The Trainer's ``_load_optimizer_and_scheduler``: weights, optimizer, scheduler and
        scaler filled in place from the snapshot; the RNG is held for :meth:`_load_rng`."""
        if checkpoint is None or self._resume is None:
            return
        trainer, resume = self._trainer, self._resume
        rng = _HeldRNG()
        parts = self._parts(trainer.model, trainer.optimizer, trainer.lr_scheduler, resume.trainer_state, rng)
        self.checkpointer.load(parts, step=resume.step)
        resume.rng, resume.loaded = rng.loaded, True

    def _load_scaler(self, checkpoint: str | None) -> None:
        """The Trainer's ``_load_scaler``: the scaler came with the optimizer (same snapshot)."""

    def _load_rng(self, checkpoint: str | None) -> None:
        """The Trainer's ``_load_rng_state``: this rank's generators, where the Trainer sets them."""
        if checkpoint is None or self._resume is None or self._resume.rng is None:
            return  # a snapshot saved on fewer ranks has none for this one (load warned)
        RNGState().load_state_dict(self._resume.rng)

    def _end_resume(self) -> None:
        """Give the trainer its own loaders back and remove the folder handed to it."""
        if self._resume is None:
            return
        for name in LOADERS:
            self._trainer.__dict__.pop(name, None)
        remove_local(self._resume.folder)
        self._resume = None

    def __repr__(self) -> str:
        return f"FmstoreCallback({os.fspath(self.root)!r})"


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its ``state_dict`` is the
    same; the inner one is what the step hooks and a fresh state's creation act on)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _torch_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler inside accelerate's ``AcceleratedScheduler``, if it is wrapped."""
    inner = getattr(scheduler, "scheduler", None)
    torch_kinds = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return inner if isinstance(inner, torch_kinds) else scheduler


def _trainer_state_file(value: dict[str, Any]) -> bytes:
    """``trainer_state.json`` for this transformers version (fields it does not know are left out:
    ``TrainerState.load_from_json`` passes every key to the constructor)."""
    known = {f.name for f in dataclasses.fields(TrainerState)}
    body = {k: v for k, v in value.items() if k in known}
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
