"""BlobStore on an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2, moto...).

Each blob is one object, ``<prefix><key>``, so several deployments (or environments) can
share a bucket by prefix. Where the bucket lives and who we are come from the standard AWS
configuration that boto3 reads itself (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles); nothing of it is a
fluxredux setting, so it is configured the way every other S3 tool is.

S3 writes are atomic per object (a reader sees the old object or the new one, never half),
which is what ``put`` promises. Every failure of the service or the way to it (unreachable,
timed out, throttled, denied, 5xx, no such bucket) is a BlobStoreError: a 503 in a request,
``storage_error`` in a worker (which retries the transient ones first). Timeouts and
retries are bounded (the storage_timeout_seconds and storage_attempts settings) so that a
dead or hung endpoint is a quick 503 rather than a request hanging for minutes.

boto3 and botocore ship no type information: the client is ``Any`` at this boundary, and
what comes out of it is converted to our own types right here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import HTTPError as Urllib3Error

from fluxredux.config import DEFAULT_STORAGE_ATTEMPTS, DEFAULT_STORAGE_TIMEOUT
from fluxredux.images.formats import content_type_for
from fluxredux.storage.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobStoreError,
    BlobStream,
    check_put,
    is_valid_key,
)


def client_config(
    timeout: float = DEFAULT_STORAGE_TIMEOUT, attempts: int = DEFAULT_STORAGE_ATTEMPTS
) -> Config:
    """The client's configuration: bounded timeouts and few tries.

    A request to a dead endpoint fails within ``timeout`` per try; one to an endpoint that
    accepts connections and then answers nothing (frozen, partitioned, overloaded) within
    ``timeout`` per socket read, not per object: a large body may take longer as long as
    bytes keep coming. ``attempts`` tries in all, with standard (jittered) backoff: a blip
    of a request is ridden out, an outage is a 503 within seconds, not a create held for
    18 s (three tries of 5 s, as before) or minutes (botocore's defaults). A worker holding
    images it made retries on its own, for longer (worker/loop.py)."""
    return Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        # Each open stream holds a connection until it is closed; the HTTP process serves
        # several downloads at once, and a full pool would open and discard connections.
        max_pool_connections=32,
        # botocore's newer default checksums (CRC32, aws-chunked bodies) are refused by some
        # S3-compatible servers; send and check them only where the API requires it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


CLIENT_CONFIG = client_config()

# What S3 (and its look-alikes) answer for an absent object or a HEAD of one.
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
# The readiness probe's object: never a valid key, so never listed as a blob.
_PROBE_PREFIX = ".ready-"

# Errors of the service, of botocore and of the connection under it (a body read that
# breaks midway can surface from urllib3 or the socket): all mean the storage failed.
_FAILURES: tuple[type[BaseException], ...] = (BotoCoreError, ClientError, Urllib3Error, OSError)


# What a failure is called in messages. These reach anonymous clients (a 503's body, /ready's
# reasons), while botocore's own text names the endpoint URL, bucket and object, and S3's
# AccessDenied message the account and user: a service error is told by its code alone
# (NoSuchBucket, AccessDenied, SlowDown...), a connection failure in words. The details
# stay in the chained exception, for the logs.
_CONNECTION_FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (EndpointConnectionError, "cannot connect to the endpoint"),
    (ConnectTimeoutError, "connecting to the endpoint timed out"),
    (ReadTimeoutError, "the endpoint did not answer in time"),
    (NoCredentialsError, "no AWS credentials are configured"),
)


# Service answers that mean "not now" rather than "never": throttled, timed out, a
# failing or overloaded server. Anything else the service refuses (AccessDenied,
# NoSuchBucket, InvalidAccessKeyId...) needs someone to act.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or (
            isinstance(status, int) and (status >= 500 or status in (408, 429))
        )
    if isinstance(exc, BotoCoreError):
        # The way to the service: refused, reset, timed out, a body cut short.
        return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError))
    return True  # urllib3 and socket errors: the connection, not the request


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code") or (f"HTTP {status}" if status else "error"))
    for kind, text in _CONNECTION_FAILURES:
        if isinstance(exc, kind):
            return text
    return type(exc).__name__


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def for_operator(failed: str, reason: str, bucket: str, endpoint: str) -> str:
    """A failure as the server's log says it: which bucket where, and for a missing
    bucket the command that creates it (the first thing a new deployment trips on)."""
    if reason == "NoSuchBucket":
        create = f"aws s3 mb s3://{bucket}"
        if not _is_aws(endpoint):  # the AWS CLI knows AWS's endpoints by itself
            create += f" --endpoint-url {endpoint}"
        return f"storage: the S3 bucket '{bucket}' does not exist at {endpoint}; create it ({create})"
    return f"storage: the S3 bucket '{bucket}' at {endpoint} {failed} ({reason})"


@contextmanager
def _s3_errors(failed: str, store: S3BlobStore) -> Iterator[None]:
    try:
        yield
    except _FAILURES as exc:
        reason = _reason(exc)
        raise BlobStoreError(
            f"the object storage {failed} ({reason})",
            reason,
            transient=_is_transient(exc),
            for_operator=for_operator(failed, reason, store.bucket, store.endpoint),
        ) from exc


def _is_not_found(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND


def _timestamp(when: datetime) -> float:
    # Whole seconds: GET and HEAD give Last-Modified as an HTTP date (to the second) while
    # listings give milliseconds; one blob must have one created time whichever is asked.
    return float(int(when.timestamp()))


def make_client(config: Config = CLIENT_CONFIG) -> Any:  # a botocore S3 client (untyped)
    """An S3 client configured from the standard AWS variables, with bounded timeouts.

    Its own session: boto3's default session is not thread-safe to create clients from,
    while a client itself may be shared by threads (the HTTP process's and a worker's)."""
    return boto3.session.Session().client("s3", config=config)


class S3BlobStore:
    # The service's own limits: DeleteObjects takes at most 1000 keys a request, and
    # ListObjectsV2 answers at most 1000 a page. Tests lower them to cross batches cheaply.
    delete_batch = 1000
    page_size = 1000

    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any = None, config: Config = CLIENT_CONFIG
    ) -> None:
        self.bucket = bucket
        # "some/prefix", "/some/prefix/" and "some/prefix/" all mean the folder some/prefix.
        stripped = prefix.strip("/")
        self.prefix = f"{stripped}/" if stripped else ""
        self._client: Any = client if client is not None else make_client(config)

    @property
    def endpoint(self) -> str:
        """Where the bucket is, for the log: the URL the client resolved from the AWS settings."""
        return str(self._client.meta.endpoint_url)

    def _errors(self, failed: str) -> AbstractContextManager[None]:
        return _s3_errors(failed, self)

    def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        check_put(key, content_type)
        with self._errors("cannot be written"):
            self._client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type
            )
        # The created time is the object's Last-Modified as the service stored it (the same
        # a later open or list reports), which a PUT's answer does not carry. The object is
        # written: a HEAD that fails now must not report the write as failed.
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            created_at = _timestamp(head["LastModified"])
        except Exception:  # any botocore/network failure: the local time is close enough
            created_at = float(int(time.time()))
        return BlobInfo(key, len(data), content_type, created_at)

    def get(self, key: str) -> bytes:
        with self.open(key) as blob:
            return b"".join(blob)

    def open(self, key: str) -> BlobStream:
        response = self._get_object(key)
        body: Any = response["Body"]  # a botocore StreamingBody

        def chunks() -> Iterator[bytes]:
            with self._errors("cannot be read"):
                # At most CHUNK_SIZE at a time off the socket: the blob is never whole in memory.
                yield from body.iter_chunks(CHUNK_SIZE)

        info = BlobInfo(
            key,
            int(response["ContentLength"]),
            # The type the key's extension names, as put checked and the local store serves:
            # an object rewritten in the bucket by other means with another type (say
            # text/html) cannot make a file link serve a page.
            str(content_type_for(key)),
            _timestamp(response["LastModified"]),
        )
        return BlobStream(info, chunks(), body.close)

    def exists(self, key: str) -> bool:
        if not is_valid_key(key):
            return False
        with self._errors("cannot be read"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise
        return True

    def delete(self, keys: Iterable[str]) -> None:
        # Absent keys are no error for DeleteObjects, so deleting twice is harmless;
        # malformed ones are dropped before they can name anything outside the prefix.
        wanted = sorted({self.prefix + key for key in keys if is_valid_key(key)})
        for start in range(0, len(wanted), self.delete_batch):
            batch = wanted[start : start + self.delete_batch]
            with self._errors("cannot delete files"):
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": name} for name in batch], "Quiet": True},
                )
            # A batch can succeed as a request and still fail per object (AccessDenied...).
            errors = [e for e in response.get("Errors", []) if e.get("Code") not in _NOT_FOUND]
            if errors:
                reason = str(errors[0].get("Code") or "error")  # the code alone, as in _reason
                raise BlobStoreError(
                    f"the object storage cannot delete files ({reason})",
                    reason,
                    for_operator=for_operator("cannot delete files", reason, self.bucket, self.endpoint),
                )

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        # Lazy, page by page: a bucket may hold far more blobs than is wise to hold in memory.
        # The Delimiter keeps "sub-folders" under the prefix (not ours) out of the listing.
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            Delimiter="/",
            PaginationConfig={"PageSize": self.page_size},
        )
        with self._errors("cannot be listed"):
            for page in pages:
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(self.prefix) :]
                    if is_valid_key(key):  # anything else in the bucket is not a blob of ours
                        yield BlobInfo(
                            key,
                            int(item["Size"]),
                            # From the formats table, not a HEAD per object.
                            str(content_type_for(key)),
                            _timestamp(item["LastModified"]),
                        )

    def check_writable(self) -> None:
        # A few bytes really written and removed: a missing bucket, wrong credentials, a
        # read-only policy or an endpoint that is down all fail here.
        probe = f"{self.prefix}{_PROBE_PREFIX}{secrets.token_urlsafe(8)}"
        with self._errors("cannot be written"):
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"ready")
            self._client.delete_object(Bucket=self.bucket, Key=probe)

    def _get_object(self, key: str) -> dict[str, Any]:
        if not is_valid_key(key):
            raise BlobNotFound(key)
        with self._errors("cannot be read"):
            try:
                response: dict[str, Any] = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as exc:
                if _is_not_found(exc):
                    raise BlobNotFound(key) from None
                raise
        return response
