"""Stage: copy a state's tensors into a reusable pool of host buffers, the only part of a
checkpoint that training waits for.

With CUDA the pool is pinned memory and device tensors are copied on a side stream (after
the work already queued on the caller's stream), so the copy runs at PCIe speed and the
caller can choose to wait for its completion event later.  The pool keeps its buffers
between saves: after the first save no memory is allocated or pinned again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..blob import as_bytes_tensor
from ..tiers.host import BufferPool


@dataclass
class StagedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: torch.Tensor  # flat uint8 view of a pooled host buffer, exactly nbytes long
    codec: list[str] = field(default_factory=list)  # empty: the raw bytes; else how data is coded

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def raw_nbytes(self) -> int:
        """The tensor's own size (``nbytes`` is the coded size when ``codec`` is set)."""
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class Staged:
    tensors: list[StagedTensor]
    event: torch.cuda.Event | None
    releases: list[Callable[[], None]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def wait(self) -> None:
        """Block until every copy has landed in host memory."""
        if self.event is not None:
            self.event.synchronize()

    def release(self) -> None:
        for r in self.releases:
            r()
        self.releases.clear()


class Stager:
    """Copies tensors into pooled host buffers (pinned when CUDA is present)."""

    def __init__(self, *, pinned: bool | None = None) -> None:
        cuda = torch.cuda.is_available()
        self.pinned = cuda if pinned is None else pinned
        self.pool = BufferPool(pinned=self.pinned)
        self._stream = torch.cuda.Stream() if cuda else None

    def stage(
        self,
        tensors: dict[str, torch.Tensor],
        gpu_encode: Callable[[str, torch.Tensor], int | None] | None = None,
    ) -> Staged:
        """Copy ``tensors`` to pooled host memory.  Where ``gpu_encode(name, tensor)`` gives an
        element width, the tensor is encoded on its GPU first (FMHS stream, see
        :mod:`fmstore.codec.huffman`) and only the encoded bytes cross PCIe; that copy has
        landed when this returns."""
        staged = Staged([], None)
        encode_jobs: list[tuple[int, tuple]] = []  # GPU encodes, run together as one pipeline
        on_device = [t for t in tensors.values() if t.device.type == "cuda"]
        try:
            if on_device and self._stream is not None:
                # Copy after the work the caller already queued (e.g. the optimizer step).
                self._stream.wait_stream(torch.cuda.current_stream(on_device[0].device))
            for name, t in tensors.items():
                src = as_bytes_tensor(t)
                width = gpu_encode(name, t) if gpu_encode is not None and src.device.type == "cuda" else None
                if width:
                    from ..codec import gpu as gpu_codec

                    buf, release = self.pool.acquire(gpu_codec.huff_host_bytes(src.numel(), width))
                    staged.releases.append(release)
                    encode_jobs.append((len(staged.tensors), (src, width, buf, None)))
                    codec = [f"planes{width}", "huff"]
                    staged.tensors.append(StagedTensor(name, t.dtype, tuple(t.shape), buf[:0], codec))
                    continue
                buf, release = self.pool.acquire(src.numel())
                staged.releases.append(release)
                dst = buf[: src.numel()]
                if src.device.type == "cuda" and self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        dst.copy_(src, non_blocking=True)
                        src.record_stream(self._stream)  # keep the source alive until copied
                elif src.device.type in ("cpu", "cuda"):
                    dst.copy_(src)
                else:
                    dst.copy_(src.cpu())
                staged.tensors.append(StagedTensor(name, t.dtype, tuple(t.shape), dst))
            if encode_jobs:
                from ..codec import gpu as gpu_codec

                try:
                    streams = gpu_codec.huff_encode_many_to_host([job for _, job in encode_jobs])
                except Exception as e:  # e.g. no GPU memory left for the encode's buffers
                    warnings.warn(
                        f"fmstore: GPU compression failed ({type(e).__name__}: {e}); staging those "
                        "tensors raw (the CPU chain compresses them in the background)",
                        stacklevel=3,
                    )
                    streams = []
                    for i, (src, _, buf, _) in encode_jobs:
                        streams.append(buf[: src.numel()].copy_(src))  # the buffer holds the raw bytes
                        staged.tensors[i].codec = []
                for (i, _), data in zip(encode_jobs, streams):
                    staged.tensors[i].data = data
            if on_device and self._stream is not None:
                staged.event = torch.cuda.Event()
                staged.event.record(self._stream)
        except BaseException:
            staged.release()
            raise
        return staged
