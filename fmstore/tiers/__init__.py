"""The four storage tiers, fastest first: device memory, host memory, local disk, object storage."""

from .base import Tier
from .device import DeviceTier
from .disk import LocalTier
from .host import BufferPool, HostTier
from .object import ObjectTier

__all__ = ["Tier", "DeviceTier", "HostTier", "BufferPool", "LocalTier", "ObjectTier"]
