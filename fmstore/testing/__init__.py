"""Helpers for testing code that uses fmstore: a real local S3 server (SeaweedFS)."""

from .seaweedfs import S3Server, start_seaweedfs

__all__ = ["S3Server", "start_seaweedfs"]
