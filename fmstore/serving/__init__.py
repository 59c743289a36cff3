"""Serving: load a committed snapshot's tensors onto a device, streamed through bounded host memory.

:func:`load_state_dict` opens the newest committed snapshot of a checkpoint root (a directory or
a URL) and places its tensors on ``device`` (or into a module in place), reading through a ring
of reusable (pinned, with CUDA) host buffers, every piece verified before it is copied; see
:mod:`fmstore.serving.loader`.

    >>> sd = load_state_dict("ckpt/run1", prefix="model", device="cuda")     # doctest: +SKIP
    >>> load_state_dict("s3://bucket/run1", into=model, prefix="model",       # doctest: +SKIP
    ...                 storage_options={...}, ring_bytes="256MiB")
"""

from __future__ import annotations

from .loader import LoadStats, StreamingLoader, load_state_dict

__all__ = ["LoadStats", "StreamingLoader", "load_state_dict"]
