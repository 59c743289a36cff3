"""DeviceTier: blobs kept in accelerator memory (HBM), or in CPU memory for ``device="cpu"``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CapacityError, ConfigError
from .memory import MemoryTier


class DeviceTier(MemoryTier):
    """Tensors held on ``device`` (``"cuda:0"``, ``"cpu"``, ...) up to ``capacity`` bytes.

    ``get`` returns a new tensor on the same device.  Memory comes from PyTorch's caching
    allocator, so freed blobs are reused without a ``cudaMalloc``.
    """

    kind = "device"

    def __init__(
        self,
        device: str | torch.device = "cuda:0",
        *,
        capacity: int | str | None = None,
        name: str | None = None,
    ) -> None:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"DeviceTier: bad device {device!r}: {e}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    f"DeviceTier({str(device)!r}): CUDA is not available on this machine; "
                    "use DeviceTier('cpu') or leave the device tier out"
                )
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"DeviceTier({str(device)!r}): only {torch.cuda.device_count()} CUDA device(s)"
                )
        super().__init__(capacity=capacity, name=name or f"device:{dev}")
        self.device = dev
        self.out_device = dev

    def _alloc(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device), _noop
        except torch.OutOfMemoryError as e:
            raise CapacityError(f"tier {self.name!r}: out of device memory for {nbytes} bytes: {e}") from None


def _noop() -> None:
    return None
