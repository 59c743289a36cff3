"""Helpers for testing code that uses fmstore: a real local S3 server (SeaweedFS); and, in
:mod:`fmstore.testing.metadata` (imports torch), a many-rank save's metadata built without
processes (rank reports, their merge and commit, resharded load plans)."""

from .seaweedfs import S3Server, start_seaweedfs

__all__ = ["S3Server", "start_seaweedfs"]
