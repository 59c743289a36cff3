"""One conformance suite for :class:`fmstore.storage.Storage`, run against local files, S3 (a real
SeaweedFS) and ``memory://``: what the tiers and the snapshot levels rely on, the same everywhere."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fmstore.errors import ConfigError, CorruptBlobError, RootNotFoundError, StorageError
from fmstore.keys import TMP_MARKER
from fmstore.storage import FsspecStorage, LocalStorage, Reader, S3Storage, Storage, open_fs
from fmstore.storage.s3 import S3_CONFIG

KINDS = [
    pytest.param("local", id="local"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
    pytest.param("memory", id="memory"),
]
#: S3's smallest multipart part: a streamed file of more than this is a multipart upload.
PART = 5 << 20


def _url(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any] | None]:
    place = uuid.uuid4().hex[:10]
    if kind == "local":
        return str(tmp_path / place), None
    if kind == "memory":
        return f"memory://fmstore-storage-tests/{place}", None
    s3 = request.getfixturevalue("s3")
    return s3.url(place), s3.storage_options


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Storage]:
    url, options = _url(request.param, request, tmp_path)
    st = Storage(url, options, part_size=PART, concurrency=4)
    yield st
    st.close()


def test_the_implementation_is_chosen_once_by_url(tmp_path, request):
    # Storage(...) opens the implementation the URL names (as pathlib.Path gives a PosixPath).
    assert isinstance(Storage(tmp_path / "a"), LocalStorage)
    assert isinstance(Storage(f"file://{tmp_path}/b"), LocalStorage)
    assert type(Storage("memory://fmstore-storage-tests/c")) is FsspecStorage
    assert isinstance(Storage(tmp_path / "d"), LocalStorage)
    assert Storage(tmp_path / "a").url == str(tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown URL scheme"):
        Storage("nosuchscheme://x/y")


@pytest.mark.s3
def test_s3_urls_open_s3_storage_and_repr_shows_no_secret(s3):
    st = Storage(s3.url("repr"), s3.storage_options)
    assert isinstance(st, S3Storage) and st.conditional
    assert repr(st) == f"S3Storage({s3.url('repr')!r})" and s3.storage_options["secret"] not in repr(st)
    fs, root = open_fs(s3.url("repr"), s3.storage_options)
    assert fs.retries == 3 and root == f"{s3.bucket}/repr"  # fmstore's time bounds, via fsspec
    st.exists("x")  # (a first request: botocore builds its client from the config)
    # botocore rewrites the retries of the config it is given: not fmstore's own, which would
    # change the next open's options and so fsspec's cache key (one more client per process).
    assert S3_CONFIG == {
        "connect_timeout": 5,
        "read_timeout": 10,
        "retries": {"max_attempts": 1, "mode": "standard"},
    }


def test_write_read_and_ranges(storage):
    data = bytes(range(256)) * 40  # 10,240 bytes
    assert storage.write("a/b/file", [data[:1000], memoryview(data)[1000:]]) == len(data)
    assert storage.read_bytes("a/b/file") == data
    assert storage.size("a/b/file") == len(data) and storage.exists("a/b/file")
    bufs = [bytearray(10), bytearray(5000), bytearray(0)]
    storage.read_ranges(
        "a/b/file", [(0, memoryview(bufs[0])), (5000, memoryview(bufs[1])), (7, memoryview(bufs[2]))]
    )
    assert bytes(bufs[0]) == data[:10] and bytes(bufs[1]) == data[5000:10000]
    storage.write("a/b/file", [b"new"])  # replaced whole
    assert storage.read_bytes("a/b/file") == b"new"
    storage.write("empty", [])
    assert storage.read_bytes("empty") == b"" and storage.size("empty") == 0


def test_near_far_and_overlapping_ranges_read_right(storage):
    """Ranges of one file near each other go as one request on object stores (COALESCE_GAP),
    far ones apart; overlapping ones share bytes: every destination gets its own bytes."""
    data = bytes(range(251)) * (3 * (1 << 20) // 251)
    storage.write("big", [data])
    want = [(0, 100), (50, 100), (1000, 7), (2 << 20, 10), (len(data) - 5, 5), (300, 0)]
    bufs = [bytearray(n) for _, n in want]
    storage.read_ranges("big", [(o, memoryview(b)) for (o, _), b in zip(want, bufs)])
    assert [bytes(b) for b in bufs] == [data[o : o + n] for o, n in want]


def test_a_read_past_the_end_is_an_error(storage):
    storage.write("f", [b"0123456789"])
    with pytest.raises(CorruptBlobError, match="truncated"):
        storage.read_ranges("f", [(5, memoryview(bytearray(10)))])

    def too_far(f: Reader) -> None:
        f.read_into([(8, memoryview(bytearray(4)))])

    with pytest.raises(CorruptBlobError, match="truncated"):
        storage.read_with("f", too_far)


def test_read_with_reads_one_version_in_pieces(storage):
    data = os.urandom(3000)
    storage.write("blob", [data])

    def read(f: Reader) -> bytes:
        head, size = f.head(100)
        rest = bytearray(size - len(head))
        f.read_into([(len(head), memoryview(rest))])
        return head + bytes(rest)

    assert storage.read_with("blob", read) == data
    storage.write("empty", [b""])
    assert storage.read_with("empty", lambda f: f.head(10)) == (b"", 0)
    assert storage.read_with("blob", lambda f: f.head(10_000)) == (data, 3000)


def test_missing_files_are_file_not_found(storage):
    for call in (
        lambda: storage.read_bytes("no/such"),
        lambda: storage.read_ranges("no/such", [(0, memoryview(bytearray(1)))]),
        lambda: storage.read_with("no/such", lambda f: f.head(1)),
        lambda: storage.size("no/such"),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    assert not storage.exists("no/such") and storage.list_dir("no") == []
    assert list(storage.scan("no")) == []


def test_an_exclusive_write_never_replaces_a_file(storage):
    assert storage.write("lock", [b"first"], exclusive=True) == 5
    with pytest.raises(FileExistsError):
        storage.write("lock", [b"second"], exclusive=True)
    assert storage.read_bytes("lock") == b"first"


def test_listing_names_direct_children_and_hides_temporary_files(storage):
    for rel in ("d/x", "d/sub/y", "d/z", "top"):
        storage.write(rel, [rel.encode()])
    temp = f"d/.z{TMP_MARKER}1-abcdef01"  # a write in progress (or a dead writer's)
    storage.write(temp, [b"partial"])
    assert storage.list_dir() == ["d", "top"]
    assert storage.list_dir("d") == ["sub", "x", "z"]
    assert sorted(storage.scan("d")) == [("d/sub/y", 7), ("d/x", 3), ("d/z", 3)]
    assert (temp, 7) in list(storage.scan(temp=True))
    assert sorted(n for n, _ in storage.scan()) == ["d/sub/y", "d/x", "d/z", "top"]


def test_delete_and_delete_dir(storage):
    storage.delete("never/there")  # fine
    storage.delete_dir("never")  # fine
    storage.write("d/only", [b"1"])
    storage.write("e/a", [b"1"])
    storage.write("e/f/b", [b"2"])
    storage.delete("d/only")
    assert not storage.exists("d/only") and storage.list_dir("d") == []
    if storage.local:  # an emptied directory goes (SeaweedFS keeps its folder until delete_dir)
        assert storage.list_dir() == ["e"]
    storage.delete_dir("e")
    storage.delete_dir("d")
    assert storage.list_dir() == [] and list(storage.scan(temp=True)) == []


def test_a_streamed_write_is_visible_only_when_complete(storage):
    size = 2 * PART + 123  # more than one part: S3 multipart, a temporary file elsewhere

    def fill(offset: int, buf: memoryview) -> None:
        buf[:] = bytes([offset // PART + 1]) * len(buf)

    assert storage.write_streamed("big", size, fill) == size
    want = b"".join(bytes([i + 1]) * min(PART, size - i * PART) for i in range(3))
    assert storage.read_bytes("big") == want

    def failing(offset: int, buf: memoryview) -> None:
        if offset >= PART:
            raise RuntimeError("source gone")
        buf[:] = b"\xee" * len(buf)

    for rel in ("big", "new"):  # replacing a file, and a new one
        with pytest.raises(RuntimeError, match="source gone"):
            storage.write_streamed(rel, size, failing)
    assert storage.read_bytes("big") == want  # the old file, whole
    assert not storage.exists("new") and sorted(storage.scan(temp=True)) == [("big", size)]


def test_conditional_requests(storage):
    if not storage.conditional:
        with pytest.raises(NotImplementedError):
            storage.put_if("lease", b"x", None)
        return
    tag = storage.put_if("lease", b"one", None)
    with pytest.raises(FileExistsError):
        storage.put_if("lease", b"two", None)  # there is one already
    assert storage.read_tagged("lease") == (b"one", tag)
    new = storage.put_if("lease", b"two", tag)
    assert new != tag and storage.read_bytes("lease") == b"two"
    with pytest.raises(FileExistsError):
        storage.put_if("lease", b"three", tag)  # a stale tag loses
    assert storage.delete_if("lease", tag) is False and storage.exists("lease")
    assert storage.delete_if("lease", new) is True and not storage.exists("lease")
    with pytest.raises(FileNotFoundError):
        storage.read_tagged("lease")


# ----------------------------------------------------------------- faults: StorageError naming the URL


def test_a_local_fault_is_a_storage_error_naming_file_and_url(tmp_path):
    st = LocalStorage(tmp_path / "root")
    st.write("dir/file", [b"x"])
    with pytest.raises(StorageError) as err:
        st.read_bytes("dir")
    assert err.value.errno == errno.EISDIR and isinstance(err.value.__cause__, IsADirectoryError)
    assert "'dir'" in str(err.value) and str(tmp_path / "root") in str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        LocalStorage(tmp_path / "file")
    with pytest.raises(RootNotFoundError):
        LocalStorage(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_client_package_errors_are_translated_and_bugs_are_not(tmp_path):
    st = LocalStorage(tmp_path)
    client_error = type("EndpointConnectionError", (Exception,), {"__module__": "botocore.exceptions"})

    def fail(exc: BaseException) -> Any:
        def call(*args: Any) -> Any:
            raise exc

        return call

    st._read_bytes = fail(client_error("could not connect"))  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="reading 'x' under .* failed: EndpointConnectionError"):
        st.read_bytes("x")
    st._read_bytes = fail(TypeError("a bug"))  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="a bug"):
        st.read_bytes("x")


@pytest.mark.s3
def test_s3_faults_are_storage_errors_naming_the_url(s3):
    missing = f"s3://{s3.bucket}-misspelt/run"
    with pytest.raises(RootNotFoundError, match="no bucket") as err:
        Storage(missing, s3.storage_options)
    assert missing in str(err.value)
    wrong = {**s3.storage_options, "secret": "not-the-secret-key"}
    with pytest.raises(StorageError, match="denied") as err:
        Storage(s3.url("x"), wrong)
    assert s3.url("x") in str(err.value) and "not-the-secret-key" not in str(err.value)
    # A request refused after construction (the bucket check skipped: an open file system).
    st = Storage(s3.url("x"), fs=open_fs(s3.url("x"), wrong))
    with pytest.raises(StorageError) as err:
        st.write("f", [b"1"])
    assert "writing 'f' under" in str(err.value) and s3.url("x") in str(err.value)
    assert "not-the-secret-key" not in str(err.value)
    st.close()
