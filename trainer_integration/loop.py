"""Checkpointing for hand-written training loops: resume or start fresh in one call, save every
k steps (or by a multi-level :class:`fmstore.Policy`), and commit a final snapshot when the job is
preempted (SIGTERM) before exiting.

    from fmstore import RNGState
    from fmstore.integrations.loop import LoopCheckpointer

    ckpt = LoopCheckpointer("ckpts/run1", {"model": model, "optim": opt, "rng": RNGState()}, every=100)
    start = ckpt.resume()                  # 0 on a fresh start, else the step it resumed from
    for step in range(start + 1, total + 1):
        train_one_step()
        ckpt.step(step)                    # saves when due; after a SIGTERM: saves, then exits
    ckpt.close()

Saves are ``block=False``: the device-to-host copy of the weights and optimizer state runs under
the next forward and backward pass, and the next ``optimizer.step()`` waits for it (see
:mod:`fmstore.checkpoint.overlap`), so a checkpoint costs the step almost nothing.

Under ``torch.distributed`` every rank runs the loop: the ranks agree each step (one small gloo
all-reduce) on whether one of them was told to stop, so all save the same final step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from fmstore import Checkpointer, Policy
from fmstore.checkpoint import SaveHandle, SnapshotNotFoundError

__all__ = ["LoopCheckpointer"]

#: Exit status after a preemption's final snapshot: what a process killed by SIGTERM reports
#: to a shell (128 + 15), so schedulers that requeue on SIGTERM see the usual code.
PREEMPTED_EXIT = 128 + signal.SIGTERM


class LoopCheckpointer:
    """Save ``state`` every ``every`` steps, resume it, and save once more on preemption.

    Parameters:
        root: a directory or URL (``s3://bucket/run``) for the snapshots.
        state: what to save and restore: tensors, JSON values and Stateful objects (model,
            optimizer, scheduler, :class:`fmstore.RNGState`, a loader with ``state_dict``).
        every: save the steps that are multiples of this (with ``policy``, the policy's
            levels decide instead, e.g. host memory every step, disk every 100).
        exit_on_preempt: after SIGTERM, :meth:`step` commits a final snapshot to every level
            and exits the process (status 143); False: it returns and :attr:`preempted` is set.
        block: wait for the copy in :meth:`step` instead of overlapping the next step.
        **options: passed to :class:`fmstore.Checkpointer` (``keep_last``, ``compression``,
            ``storage_options``, ...).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        state: dict[str, Any],
        *,
        every: int = 100,
        policy: Policy | None = None,
        exit_on_preempt: bool = True,
        block: bool = False,
        **options: Any,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.state = state
        self.every = every
        self.block = block
        self.exit_on_preempt = exit_on_preempt
        self.policy = policy
        self.checkpointer = Checkpointer(root, policy=policy, **options)
        self.preempted = False
        self._signalled = threading.Event()
        self._last_saved: int | None = None
        self._last: SaveHandle | None = None
        self._reserved = False
        self._group = _gloo_group() if self.checkpointer.world_size > 1 else None
        self._previous_handler: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def resume(self, step: int | None = None) -> int:
        """Restore the latest (or ``step``'s) committed snapshot into ``state`` in place; the step
        it holds, or 0 when there is none yet (a fresh start; ``state`` is left as it is)."""
        try:
            self.checkpointer.load(self.state, step)
        except SnapshotNotFoundError:
            if step is not None:
                raise
            return 0
        restored = step if step is not None else self.checkpointer.latest()
        assert restored is not None
        self._last_saved = restored
        return restored

    def step(self, step: int) -> SaveHandle | None:
        """Call after each optimizer step: saves ``step`` when it is due, and after a SIGTERM
        saves it to every level, waits for the commit and exits (or returns, see
        ``exit_on_preempt``).  The handle of a save made, else None."""
        if not self._reserved:  # the optimizer's state exists now: pin the saves' memory once,
            self._reserved = True  # here rather than under the first save's overlap with training
            self.checkpointer.reserve(self.state)
        stop = self._agree(self._signalled.is_set())
        handle = None
        if stop:
            handle = self._save(step, final=True)
            self.preempted = True
            print(f"fmstore: preempted: step {step} committed, exiting", file=sys.stderr, flush=True)
            if self.exit_on_preempt:
                self.close()
                raise SystemExit(PREEMPTED_EXIT)
            return handle
        if self._due(step):
            handle = self._save(step, final=False)
        return handle

    def finish(self, step: int) -> SaveHandle | None:
        """Call after the last optimizer step instead of :meth:`step`: commits ``step`` to every
        level and waits, so a run that ends between two due steps still leaves its final state
        durable (as a preemption does)."""
        return self._save(step, final=True)

    def _due(self, step: int) -> bool:
        if self.policy is None:
            return step % self.every == 0
        return self.policy.host_memory > 0 or any(lvl.takes(step) for lvl in self.checkpointer.levels)

    def _save(self, step: int, *, final: bool) -> SaveHandle | None:
        if self._last_saved == step:  # already saved (the policy took it): just make it durable
            if final and self._last is not None:
                self._last.wait()
            return self._last
        handle = self.checkpointer.save(
            step, self.state, block=self.block or final, levels="all" if final else None
        )
        self._last_saved, self._last = step, handle
        if final:
            handle.wait()
        return handle

    def _agree(self, mine: bool) -> bool:
        """Whether any rank was told to stop (every rank must call this each step)."""
        if self._group is None:
            return mine
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(mine)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._signalled.set()  # acted on at the next step boundary, where the state is whole

    def wait(self) -> None:
        """Wait for the saves in flight."""
        self.checkpointer.wait()

    def close(self) -> None:
        """Wait for the saves in flight and release the checkpointer; restore the SIGTERM handler."""
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        self.checkpointer.close()

    def __enter__(self) -> LoopCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gloo_group() -> Any:
    """A CPU group for the per-step stop flag (the default group may be NCCL)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")
