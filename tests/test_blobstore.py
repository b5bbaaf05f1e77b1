"""The BlobStore contract, run against every implementation, and /files/{name} serving
from it.

The contract runs on each engine of the "blobs" seam in tests/backends.py (adding a
backend is one line there): a local directory, and S3 on a moto server (one per session,
see conftest.s3_endpoint) with a fresh bucket per test."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from fluxredux.config import Settings
from fluxredux.errors import StorageError
from fluxredux.images import ACCEPTED_FORMATS, CONTENT_TYPES, EXTENSIONS
from fluxredux.images.formats import (
    CONTENT_TYPES_BY_EXTENSION,
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    content_type_for,
)
from fluxredux.storage import (
    CHUNK_SIZE,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    BlobStream,
    LocalBlobStore,
    blob_store,
    is_valid_key,
    new_key,
    parse_storage_url,
)
from fluxredux.storage.s3 import CLIENT_CONFIG, S3BlobStore
from tests.backends import Engine, fresh_bucket, s3_client
from tests.harness import running_server

SEAM = "blobs"


@pytest.fixture
def store(engine: Engine) -> BlobStore:
    return engine.open()


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


# --- S3 ---------------------------------------------------------------------------------


def test_the_s3_storage_setting_writes_under_its_prefix_and_lists_only_blobs(
    s3_env: str, tmp_path: Path
) -> None:
    bucket = fresh_bucket(s3_env)
    store = blob_store(Settings(data_dir=tmp_path / "data", storage=f"s3://{bucket}/some/prefix"))
    assert isinstance(store, S3BlobStore)
    name = new_key("png")
    store.put(name, b"png bytes", PNG)
    raw = s3_client(s3_env)
    listed = raw.list_objects_v2(Bucket=bucket)["Contents"]
    assert [(item["Key"], item["Size"]) for item in listed] == [(f"some/prefix/{name}", 9)]
    head = raw.head_object(Bucket=bucket, Key=f"some/prefix/{name}")
    assert head["ContentType"] == PNG
    # Whatever else is in the bucket is not ours: beside the prefix, in a "folder" under it,
    # or a name that is no key. It is never listed (so never expired) nor served.
    for stray in (
        new_key("png"),
        f"some/prefix/sub/{new_key('png')}",
        "some/prefix/notes.txt",
        "some/prefixed.png",
    ):
        raw.put_object(Bucket=bucket, Key=stray, Body=b"x")
    assert [info.key for info in store.list()] == [name]
    assert not store.exists("notes.txt") and store.get(name) == b"png bytes"
    assert not (tmp_path / "data" / "files").exists()  # nothing went to the data dir


def test_s3_lists_and_deletes_page_by_page(s3_endpoint: str) -> None:
    """ListObjectsV2 answers a page at a time and DeleteObjects takes a batch a call (1000
    each on S3; lowered here to cross several pages cheaply)."""
    bucket = fresh_bucket(s3_endpoint)
    raw = s3_client(s3_endpoint)
    store = S3BlobStore(bucket, "p", client=raw)
    store.page_size, store.delete_batch = 3, 2
    names = sorted(new_key("png") for _ in range(8))
    for name in names:
        raw.put_object(Bucket=bucket, Key=f"p/{name}", Body=b"x")
    assert [info.key for info in store.list()] == names
    store.delete(names[:5])
    assert [info.key for info in store.list()] == names[5:]
    store.delete(names)
    assert list(store.list()) == [] and "Contents" not in raw.list_objects_v2(Bucket=bucket)


def test_a_missing_bucket_is_a_storage_error(s3_env: str) -> None:
    store = S3BlobStore(f"missing-{secrets.token_hex(4)}")
    attempts: list[Callable[[], object]] = [
        store.check_writable,
        lambda: store.put(new_key("png"), b"x", PNG),
        lambda: list(store.list()),
        lambda: store.get(new_key("png")),
    ]
    for attempt in attempts:
        with pytest.raises(BlobStoreError) as raised:
            attempt()
        assert raised.value.code == "storage_error" and "NoSuchBucket" in raised.value.reason
        assert not raised.value.transient  # someone has to act: a worker does not wait for it


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again on return: connections are refused


def test_an_s3_endpoint_that_is_down_is_a_storage_error_within_seconds(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    store = blob_store(Settings(data_dir=tmp_path, storage="s3://fluxredux-outputs"))
    attempts: list[Callable[[], object]] = [
        store.check_writable,
        lambda: store.open(new_key("png")),
        lambda: store.exists(new_key("png")),
    ]
    for attempt in attempts:
        started = time.monotonic()
        with pytest.raises(BlobStoreError) as raised:
            attempt()
        # A few quick retries, then a 503 (storage_error), never a request hanging on.
        assert time.monotonic() - started < 8
        assert isinstance(raised.value, StorageError) and raised.value.code == "storage_error"
        assert "object storage" in raised.value.message and raised.value.reason
        assert raised.value.transient  # it may come back: a worker holding outputs retries


def test_the_storage_settings_bound_every_s3_request(s3_env: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, storage="s3://fluxredux-outputs", storage_timeout_seconds=1.5, storage_attempts=1
    )
    store = blob_store(settings)
    assert isinstance(store, S3BlobStore)
    config = store._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1.5, 1.5)
    assert config.retries["total_max_attempts"] == 1


# --- choosing the storage by URL ----------------------------------------------------------


def test_a_file_url_stores_in_that_directory_and_no_setting_in_the_data_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared mount"
    store = blob_store(Settings(data_dir=tmp_path / "data", storage=f"file://{shared}/"))
    name = new_key("jpg")
    store.put(name, b"jpeg", "image/jpeg")
    assert (shared / name).read_bytes() == b"jpeg"
    assert not (tmp_path / "data" / "files").exists()
    # %-escapes are decoded, as in any file URL
    assert parse_storage_url("file:///srv/shared%20mount") == ("file", "/srv/shared mount", "")

    default = blob_store(Settings(data_dir=tmp_path / "data"))
    default.put(name, b"jpeg", "image/jpeg")
    assert (tmp_path / "data" / "files" / name).exists()


def test_s3_urls_are_a_bucket_and_a_prefix() -> None:
    assert parse_storage_url("s3://outputs") == ("s3", "outputs", "")
    assert parse_storage_url("s3://outputs/") == ("s3", "outputs", "")
    assert parse_storage_url("s3://my.bucket-1/fluxredux/prod/") == ("s3", "my.bucket-1", "fluxredux/prod")
    assert S3BlobStore("b", "/a/b/", client=object()).prefix == "a/b/"
    assert S3BlobStore("b", "", client=object()).prefix == ""


@pytest.mark.parametrize(
    "bad",
    [
        "/srv/files",  # a path, not a URL
        "files",
        "ftp://host/files",
        "file://otherhost/srv/files",
        "file:///",
        "file:relative/dir",
        "s3://",
        "s3:///prefix-without-bucket",
        "s3://Upper_Case/x",
        "s3://ab",
        "s3://bucket/a/../b",
        "s3://bucket/a//b",
        "s3://bucket/x?versionId=1",
    ],
)
def test_a_bad_storage_url_is_an_error_naming_the_setting(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=r"storage setting \(FLUXREDUX_STORAGE\)"):
        blob_store(Settings(data_dir=tmp_path, storage=bad))


# --- /files/{name} from S3 ---------------------------------------------------------------


def test_a_large_file_streams_from_s3_in_chunks(
    s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = fresh_bucket(s3_env)
    with running_server(tmp_path, run_worker=False, storage=f"s3://{bucket}/served") as api:
        store = api.services.blobs
        assert isinstance(store, S3BlobStore)
        data = os.urandom(5 * 1024 * 1024 + 11)
        name = new_key("webp")
        store.put(name, data, "image/webp")

        # What the server reads from the store, chunk by chunk: never the whole blob at once.
        served: list[int] = []
        opened = store.open

        def spying_open(key: str) -> BlobStream:
            blob = opened(key)

            def chunks() -> Iterator[bytes]:
                for chunk in blob:
                    served.append(len(chunk))
                    yield chunk

            return BlobStream(blob.info, chunks(), blob.close)

        monkeypatch.setattr(store, "open", spying_open)
        with httpx.stream("GET", f"{api.url}/files/{name}") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/webp"
            assert response.headers["content-length"] == str(len(data))
            assert b"".join(response.iter_bytes()) == data
        assert len(served) >= 5 * 1024 * 1024 // CHUNK_SIZE and max(served) <= CHUNK_SIZE
        assert sum(served) == len(data)
        assert httpx.get(f"{api.url}/files/{new_key('webp')}").status_code == 404


def test_when_s3_is_down_files_are_a_503_and_ready_says_why(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with running_server(tmp_path, run_worker=False, storage="s3://fluxredux-outputs") as api:
        response = httpx.get(f"{api.url}/files/{new_key('png')}", timeout=30)
        assert response.status_code == 503 and response.json()["code"] == "storage_error"
        ready = httpx.get(f"{api.url}/ready", timeout=30)
        assert ready.status_code == 503
        assert any("object storage cannot be written" in reason for reason in ready.json()["reasons"])


def test_an_s3_endpoint_that_never_answers_is_a_storage_error_after_the_timeouts() -> None:
    """A stalled endpoint (it accepts connections, then says nothing) fails by read timeout:
    here one try of 0.2 s instead of the default two of 3 s (their backoff is random)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes connections; nobody ever reads or answers
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=CLIENT_CONFIG.merge(
                Config(connect_timeout=0.2, read_timeout=0.2, retries={"total_max_attempts": 1})
            ),
        )
        store = S3BlobStore("fluxredux-outputs", client=client)
        started = time.monotonic()
        with pytest.raises(BlobStoreError) as raised:
            store.check_writable()
        assert time.monotonic() - started < 3
        assert raised.value.reason == "the endpoint did not answer in time"
