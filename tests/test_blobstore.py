"""The BlobStore contract, run against every implementation, and /files/{name} serving
from it.

Adding a backend is one line in IMPLEMENTATIONS: a context manager that yields an empty
store (an S3 one would start a moto server and a bucket)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest

from fluxredux.errors import StorageError
from fluxredux.formats import CONTENT_TYPES_BY_EXTENSION, INPUT_FORMATS, OUTPUT_FORMATS, content_type_for
from fluxredux.images import ACCEPTED_FORMATS, CONTENT_TYPES, EXTENSIONS
from fluxredux.storage import (
    CHUNK_SIZE,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    LocalBlobStore,
    is_valid_key,
    new_key,
)
from tests.harness import running_server


@contextmanager
def local_store(tmp_path: Path) -> Iterator[BlobStore]:
    yield LocalBlobStore(tmp_path / "blobs")


IMPLEMENTATIONS: dict[str, Callable[[Path], AbstractContextManager[BlobStore]]] = {
    "local": local_store,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    with IMPLEMENTATIONS[request.param](tmp_path) as made:
        yield made


def key(prefix: str = "", extension: str = "png") -> str:
    """A valid key starting with ``prefix`` (random keys never share a chosen prefix)."""
    return (prefix + new_key(extension))[:22] + "." + extension


PNG = "image/png"


# --- the contract ----------------------------------------------------------------------


def test_put_then_get_round_trips_the_bytes_and_the_content_type(store: BlobStore) -> None:
    before = time.time()
    name = new_key("webp")
    info = store.put(name, b"RIFF....WEBP", "image/webp")
    assert (info.key, info.size, info.content_type) == (name, 12, "image/webp")
    assert before - 2 <= info.created_at <= time.time() + 2
    assert store.get(name) == b"RIFF....WEBP"
    with store.open(name) as blob:
        assert blob.info == info
        assert b"".join(blob) == b"RIFF....WEBP"


def test_put_replaces_a_blob_whole(store: BlobStore) -> None:
    name = new_key("png")
    store.put(name, b"first version", PNG)
    store.put(name, b"second", PNG)
    assert store.get(name) == b"second"
    assert [info.size for info in store.list()] == [6]


def test_open_streams_a_large_blob_in_chunks(store: BlobStore) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    name = new_key("png")
    store.put(name, data, PNG)
    with store.open(name) as blob:
        assert (blob.info.size, blob.info.content_type) == (len(data), PNG)
        chunks = list(blob)
    assert len(chunks) > 1 and max(len(chunk) for chunk in chunks) <= CHUNK_SIZE
    assert b"".join(chunks) == data


def test_a_stream_closed_before_its_end_releases_the_blob(store: BlobStore) -> None:
    name = new_key("png")
    store.put(name, os.urandom(3 * CHUNK_SIZE), PNG)
    blob = store.open(name)
    assert len(next(iter(blob))) == CHUNK_SIZE
    blob.close()
    blob.close()  # idempotent
    store.delete([name])
    assert not store.exists(name)


def test_exists_and_delete_are_idempotent(store: BlobStore) -> None:
    name, other = new_key("png"), new_key("jpg")
    assert not store.exists(name)
    store.put(name, b"a", PNG)
    store.put(other, b"b", "image/jpeg")
    assert store.exists(name) and store.exists(other)
    store.delete([name, name, new_key("png"), "../../etc/passwd", ""])  # absent and malformed: skipped
    assert not store.exists(name) and store.exists(other)
    store.delete([name])
    store.delete([])
    with pytest.raises(BlobNotFound):
        store.get(name)
    with pytest.raises(BlobNotFound):
        store.open(name)
    assert [info.key for info in store.list()] == [other]


def test_list_by_prefix_with_size_type_and_created_time(store: BlobStore) -> None:
    assert list(store.list()) == []
    before = time.time()
    a1, a2, b1 = key("AAAA"), key("AAAB", "jpg"), key("BBBB", "gif")
    store.put(a1, b"1", PNG)
    store.put(a2, b"22", "image/jpeg")
    store.put(b1, b"333", "image/gif")
    listed = list(store.list())
    assert [(i.key, i.size, i.content_type) for i in listed] == [
        (a1, 1, PNG),
        (a2, 2, "image/jpeg"),
        (b1, 3, "image/gif"),
    ]
    assert all(before - 2 <= i.created_at <= time.time() + 2 for i in listed)
    assert [i.key for i in store.list("AAA")] == [a1, a2]
    assert [i.key for i in store.list("AAAB")] == [a2]
    assert [i.key for i in store.list(b1)] == [b1]
    assert list(store.list("Z")) == []


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../AAAAAAAAAAAAAAAAAAAAAA.png",
        "AAAAAAAAAAAAAAAAAAAAAA.png/..",
        "a/AAAAAAAAAAAAAAAAAAAAAA.png",
        "AAAAAAAAAAAAAAAAAAAAA.png",  # 21 characters
        "AAAAAAAAAAAAAAAAAAAAAA.exe",
        "AAAAAAAAAAAAAAAAAAAAAA",
        ".AAAAAAAAAAAAAAAAAAAAA.png",
        "AAAAAAAAAAAAAAAAAAAAA%.png",
    ],
)
def test_malformed_keys_are_refused(store: BlobStore, bad: str) -> None:
    assert not is_valid_key(bad)
    with pytest.raises(ValueError):
        store.put(bad, b"x", PNG)
    with pytest.raises(BlobNotFound):
        store.get(bad)
    with pytest.raises(BlobNotFound):
        store.open(bad)
    assert not store.exists(bad)
    assert list(store.list()) == []


def test_a_content_type_the_extension_does_not_name_is_refused(store: BlobStore) -> None:
    with pytest.raises(ValueError):
        store.put(new_key("png"), b"x", "image/jpeg")
    with pytest.raises(ValueError):
        store.put(new_key("png"), b"x", "text/html")
    assert list(store.list()) == []


def test_check_writable_leaves_no_blob(store: BlobStore) -> None:
    store.check_writable()
    assert list(store.list()) == []


# --- the local directory ---------------------------------------------------------------------


def test_local_failures_are_storage_errors(tmp_path: Path) -> None:
    """A root that cannot be written (here: it became a file, which fails even for root)
    raises BlobStoreError, a StorageError: a 503 in requests, storage_error in a worker."""
    store = LocalBlobStore(tmp_path / "blobs")
    store.root.rmdir()
    store.root.write_bytes(b"not a directory")
    attempts: list[Callable[[], object]] = [
        lambda: store.put(new_key("png"), b"x", PNG),
        store.check_writable,
        store.list,
        lambda: store.exists(new_key("png")),
        lambda: store.get(new_key("png")),
    ]
    for attempt in attempts:
        with pytest.raises(BlobStoreError) as raised:
            attempt()
        assert isinstance(raised.value, StorageError) and raised.value.code == "storage_error"
        assert raised.value.reason and "file storage" in raised.value.message


def test_local_temp_files_are_not_blobs_and_stale_ones_are_cleared(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    root.mkdir()
    stale, fresh = root / ".incoming-stale", root / ".incoming-fresh"
    stale.write_bytes(b"half a write")
    fresh.write_bytes(b"a write going on")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store = LocalBlobStore(root)
    assert not stale.exists() and fresh.exists()  # another process may be writing that one
    assert list(store.list()) == []


def test_local_write_leaves_no_temp_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    name = new_key("png")
    store.put(name, b"x", PNG)
    assert sorted(p.name for p in store.root.iterdir()) == [name]


# --- keys and the formats table ------------------------------------------------------


def test_new_keys_are_random_valid_and_refuse_unknown_extensions() -> None:
    keys = {new_key("png") for _ in range(1000)}
    assert len(keys) == 1000 and all(is_valid_key(k) and len(k) == 26 for k in keys)
    with pytest.raises(ValueError):
        new_key("exe")


def test_one_table_of_formats() -> None:
    assert set(INPUT_FORMATS) == set(ACCEPTED_FORMATS)  # what decode accepts, we can store
    assert set(OUTPUT_FORMATS) <= {f.extension for f in INPUT_FORMATS.values()}
    assert {name: f.extension for name, f in OUTPUT_FORMATS.items()} == EXTENSIONS
    assert {name: f.content_type for name, f in OUTPUT_FORMATS.items()} == CONTENT_TYPES
    assert CONTENT_TYPES_BY_EXTENSION["jpeg"] == "image/jpeg"  # names of early versions
    assert content_type_for("x.gif") == "image/gif" and content_type_for("x.exe") is None
    assert content_type_for("png") is None


# --- /files/{name} streams from the store ----------------------------------------------------


def test_files_are_streamed_with_type_length_and_cache_headers(tmp_path: Path) -> None:
    with running_server(tmp_path, run_worker=False) as api:
        data = os.urandom(3 * 1024 * 1024 + 7)
        name = new_key("webp")
        api.services.blobs.put(name, data, "image/webp")
        with httpx.stream("GET", f"{api.url}/files/{name}") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/webp"
            assert response.headers["content-length"] == str(len(data))
            assert response.headers["cache-control"] == "public, max-age=604800, immutable"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert b"".join(response.iter_bytes()) == data
        for missing in (new_key("webp"), "nope.png", name.replace(".webp", ".png"), "..%2Ffluxredux.db"):
            response = httpx.get(f"{api.url}/files/{missing}")
            assert response.status_code == 404 and response.json()["code"] == "not_found", missing
