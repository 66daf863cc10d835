"""The S3 archive adapter: moto for behaviour, Stubber and a local server for errors."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from botocore.stub import Stubber
from moto import mock_aws

from cxr_daemon.adapters.aws import map_aws_error
from cxr_daemon.adapters.s3 import S3_ERRORS, S3ObjectStore, make_s3_client
from cxr_daemon.config import S3Config
from cxr_daemon.errors import ConfigError, PermanentError, TransientError
from cxr_daemon.ports import ObjectStore
from tests.support.aws import REGION, fast_policy, isolate_from_aws
from tests.support.httpserver import local_http_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from mypy_boto3_s3 import S3Client

BUCKET = "cxrd-test"
SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_from_aws(monkeypatch, tmp_path)


def make_store(**overrides: str) -> S3ObjectStore:
    cfg = S3Config(**{"bucket": BUCKET, "prefix": "prod", "region": REGION, **overrides})
    return S3ObjectStore(cfg, fast_policy())


def new_bucket(*, versioned: bool = False) -> S3Client:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    if versioned:
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return s3


# -- behaviour against moto ------------------------------------------------------


@mock_aws
def test_put_writes_bytes_under_prefix_with_content_type_and_metadata() -> None:
    """Bytes land at {prefix}/{key} with the given Content-Type and user metadata."""
    s3 = new_bucket()
    make_store().put("studies/1.2/report/report.json", b"{}", "application/json", {"run-id": "r1"})
    obj = s3.get_object(Bucket=BUCKET, Key="prod/studies/1.2/report/report.json")
    assert obj["Body"].read() == b"{}"
    assert obj["ContentType"] == "application/json"
    assert obj["Metadata"] == {"run-id": "r1"}
    assert "ServerSideEncryption" not in obj


@pytest.mark.parametrize(
    ("prefix", "key", "expected"),
    [("", "a/b.jpg", "a/b.jpg"), ("prod/", "/a/b.jpg", "prod/a/b.jpg"), ("/x/y", "b", "x/y/b")],
)
@mock_aws
def test_keys_never_get_a_double_or_leading_slash(prefix: str, key: str, expected: str) -> None:
    """An empty prefix or stray slashes still give a clean key."""
    s3 = new_bucket()
    make_store(prefix=prefix).put(key, b"x", "image/jpeg", {})
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == [expected]


@mock_aws
def test_sse_aes256_is_requested() -> None:
    """sse = "AES256" stores the object with S3-managed encryption."""
    s3 = new_bucket()
    make_store(sse="AES256").put("k", b"x", "text/plain", {})
    assert s3.head_object(Bucket=BUCKET, Key="prod/k")["ServerSideEncryption"] == "AES256"


@mock_aws
def test_sse_kms_with_key_id() -> None:
    """sse = "aws:kms" with kms_key_id stores the object under that key."""
    s3 = new_bucket()
    key_id = "arn:aws:kms:us-east-1:123456789012:key/1234abcd"
    make_store(sse="aws:kms", kms_key_id=key_id).put("k", b"x", "text/plain", {})
    head = s3.head_object(Bucket=BUCKET, Key="prod/k")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key_id


@mock_aws
def test_sse_kms_without_key_id_uses_the_default_key() -> None:
    """sse = "aws:kms" without kms_key_id sends no key id (S3 uses aws/s3)."""
    s3 = new_bucket()
    make_store(sse="aws:kms").put("k", b"x", "text/plain", {})
    head = s3.head_object(Bucket=BUCKET, Key="prod/k")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "SSEKMSKeyId" not in head


@mock_aws
def test_path_body_is_stored_whole(tmp_path: Path) -> None:
    """A Path body (a DICOM file) is uploaded byte for byte."""
    s3 = new_bucket()
    data = bytes(range(256)) * 12_000  # 3 MB
    src = tmp_path / "x.dcm"
    src.write_bytes(data)
    make_store().put("studies/1.2/input/dicom/1.2.3.dcm", src, "application/dicom", {})
    body = s3.get_object(Bucket=BUCKET, Key="prod/studies/1.2/input/dicom/1.2.3.dcm")["Body"]
    assert body.read() == data


@mock_aws
def test_path_body_is_streamed_and_reopened_on_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Path goes out as a file stream; an attempt that died mid-upload is redone whole."""
    s3 = new_bucket()
    data = b"0123456789" * 100_000
    src = tmp_path / "x.dcm"
    src.write_bytes(data)
    store = make_store()
    real_put = store._client.put_object
    bodies: list[object] = []

    def dies_mid_upload_once(**kwargs: Any) -> object:
        bodies.append(kwargs["Body"])
        if len(bodies) == 1:
            kwargs["Body"].read(12_345)
            error: Any = {"Error": {"Code": "SlowDown"}}
            error["ResponseMetadata"] = {"HTTPStatusCode": 503}
            raise ClientError(error, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(store._client, "put_object", dies_mid_upload_once)
    store.put("big.dcm", src, "application/dicom", {})
    assert len(bodies) == 2
    assert all(hasattr(b, "read") and not isinstance(b, bytes) for b in bodies)
    assert s3.get_object(Bucket=BUCKET, Key="prod/big.dcm")["Body"].read() == data


def test_uri_names_the_bucket_and_the_prefixed_key() -> None:
    """uri(key) is the s3:// address people can paste, prefix included."""
    store: ObjectStore = make_store()  # mypy checks the protocol here
    assert store.uri("studies/1.2/") == "s3://cxrd-test/prod/studies/1.2/"
    assert make_store(prefix="").uri("a.json") == "s3://cxrd-test/a.json"


@mock_aws
def test_delete_removes_the_object() -> None:
    """delete(key) removes {prefix}/{key}."""
    s3 = new_bucket()
    store = make_store()
    store.put("k", b"x", "text/plain", {})
    store.delete("k")
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0


@mock_aws
def test_ping_creates_and_removes_a_probe_under_the_check_prefix() -> None:
    """ping writes a probe under {prefix}/.cxrd-check/ and deletes it again."""
    s3 = new_bucket(versioned=True)
    assert "writable" in make_store().ping()
    history = s3.list_object_versions(Bucket=BUCKET)
    written = [v["Key"] for v in history.get("Versions", [])]
    deleted = [m["Key"] for m in history.get("DeleteMarkers", [])]
    assert len(written) == 1
    assert written[0].startswith("prod/.cxrd-check/")
    assert deleted == written
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0


@mock_aws
def test_missing_bucket_is_a_config_error() -> None:
    """A bucket that does not exist stops cxrd (ConfigError), naming the bucket."""
    with pytest.raises(ConfigError, match=r"NoSuchBucket.*s3://cxrd-test/"):
        make_store().ping()


def test_non_ascii_metadata_is_refused_before_sending() -> None:
    """Metadata must be ASCII (HTTP headers): PermanentError, nothing sent."""
    store = make_store()
    with Stubber(store._client), pytest.raises(PermanentError, match="not printable ASCII"):
        store.put("k", b"x", "text/plain", {"view": "정면"})


def test_missing_file_is_permanent(tmp_path: Path) -> None:
    """A Path that cannot be opened fails the study with the path, nothing sent."""
    store = make_store()
    with Stubber(store._client), pytest.raises(PermanentError, match=r"cannot read .*gone\.dcm"):
        store.put("k", tmp_path / "gone.dcm", "application/dicom", {})


# -- error mapping -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, TransientError),
        ("InternalError", 500, TransientError),
        ("ServiceUnavailable", 503, TransientError),
        ("RequestTimeout", 400, TransientError),
        ("OperationAborted", 409, TransientError),
        ("SomethingNew", 502, TransientError),
        ("AccessDenied", 403, ConfigError),
        ("InvalidAccessKeyId", 403, ConfigError),
        ("SignatureDoesNotMatch", 403, ConfigError),
        ("NoSuchBucket", 404, ConfigError),
        ("KMS.NotFoundException", 400, ConfigError),
        ("InvalidArgument", 400, PermanentError),
        ("EntityTooLarge", 400, PermanentError),
        ("InvalidRequest", 400, PermanentError),
    ],
)
def test_client_error_mapping(code: str, status: int, kind: type[Exception]) -> None:
    """Each S3 error code/status maps to one error kind; transient ones are retried to the limit."""
    store = make_store()
    attempts = 3 if kind is TransientError else 1
    with Stubber(store._client) as stub:
        for _ in range(attempts):
            stub.add_client_error("put_object", code, "msg", http_status_code=status)
        with pytest.raises(kind, match=code) as info:
            store.put("k", b"x", "text/plain", {})
        stub.assert_no_pending_responses()
    assert type(info.value) is kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (EndpointConnectionError(endpoint_url="http://s3"), TransientError),
        (ConnectTimeoutError(endpoint_url="http://s3"), TransientError),
        (ReadTimeoutError(endpoint_url="http://s3"), TransientError),
        (ConnectionClosedError(endpoint_url="http://s3"), TransientError),
        (NoCredentialsError(), ConfigError),
        (ParamValidationError(report="bad"), PermanentError),
    ],
)
def test_botocore_error_mapping(exc: Exception, kind: type[Exception]) -> None:
    """Connection failures are transient, missing credentials fatal, bad parameters permanent."""
    mapped = map_aws_error(exc, "s3.put", S3_ERRORS, "s3://b/k")  # type: ignore[arg-type]
    assert type(mapped) is kind
    assert str(mapped).startswith("s3.put: S3 for s3://b/k: ")


def test_no_credentials_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no credentials anywhere, a put fails with ConfigError before anything is sent."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="credentials"):
        make_store(endpoint_url="http://127.0.0.1:9").put("k", b"x", "text/plain", {})


def test_unreachable_endpoint_is_transient() -> None:
    """A refused connection is a TransientError after the policy's attempts."""
    with pytest.raises(TransientError, match=r"127\.0\.0\.1:9"):
        make_store(endpoint_url="http://127.0.0.1:9").put("k", b"x", "text/plain", {})


def test_bad_endpoint_url_is_a_config_error() -> None:
    """An endpoint_url botocore cannot use stops cxrd at start-up."""
    with pytest.raises(ConfigError, match="Invalid endpoint"):
        make_store(endpoint_url="not a url")


def test_client_makes_one_http_attempt_per_call() -> None:
    """botocore's own retries are off: the retry policy is the only retry layer."""
    client = make_s3_client(S3Config(bucket=BUCKET, region=REGION))
    retries = client.meta.config.retries  # type: ignore[attr-defined]
    assert retries == {"total_max_attempts": 1, "mode": "standard"}


# -- a real HTTP server --------------------------------------------------------------


class _AlwaysSlowDown(BaseHTTPRequestHandler):
    # HTTP/1.1 so the server answers botocore's "Expect: 100-continue" at once.
    protocol_version = "HTTP/1.1"
    hits = 0

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).hits += 1
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(SLOWDOWN)))
        self.end_headers()
        self.wfile.write(SLOWDOWN)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def slowdown_server() -> Iterator[tuple[str, type[_AlwaysSlowDown]]]:
    handler = type("Handler", (_AlwaysSlowDown,), {"hits": 0})
    with local_http_server(handler) as url:
        yield url, handler


def test_slowdown_makes_exactly_the_policy_attempts(
    slowdown_server: tuple[str, type[_AlwaysSlowDown]],
) -> None:
    """A bucket that always answers 503 SlowDown sees 3 HTTP requests, not 3 x botocore's 3."""
    url, handler = slowdown_server
    with pytest.raises(TransientError, match=r"SlowDown \(HTTP 503\)"):
        make_store(endpoint_url=url).put("k", b"x", "text/plain", {})
    assert handler.hits == fast_policy().attempts == 3
