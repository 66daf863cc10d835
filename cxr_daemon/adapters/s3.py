"""The S3 archive (``ObjectStore``): AWS S3, or MinIO/Ceph/moto via ``endpoint_url``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from botocore.config import Config

from cxr_daemon.adapters.aws import ErrorTable, aws_call, client_config, create_client, new_session
from cxr_daemon.errors import PermanentError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import PutObjectRequestTypeDef

    from cxr_daemon.adapters.retry import RetryPolicy
    from cxr_daemon.config import S3Config

# A DICOM file is tens of MB at most; a put that has not finished reading the
# answer after a minute is stuck, not slow.
READ_TIMEOUT_S = 60.0
PROBE_DIR = ".cxrd-check"

S3_ERRORS = ErrorTable(
    service="S3",
    # A missing bucket or an unusable KMS key (S3 passes KMS's errors on with a
    # "KMS." prefix): nothing works until the configuration changes.
    config=frozenset(
        {
            "NoSuchBucket",
            "AllAccessDisabled",
            "InvalidBucketName",
            "PermanentRedirect",
            "KMS.DisabledException",
            "KMS.NotFoundException",
            "KMS.KMSInvalidStateException",
        }
    ),
    transient=frozenset({"OperationAborted", "KMS.ThrottlingException"}),
)


def make_s3_client(cfg: S3Config) -> S3Client:
    """A boto3 S3 client for ``cfg`` with botocore's own retries off.

    Raises:
        ConfigError: the endpoint URL or the AWS setup is unusable.
    """
    config = client_config(READ_TIMEOUT_S)
    if cfg.endpoint_url:
        # MinIO and Ceph answer path-style everywhere; virtual-host style needs
        # wildcard DNS that on-prem installs rarely have.
        config = config.merge(Config(s3={"addressing_style": "path"}))
    return create_client(
        lambda: new_session(cfg.region).client(
            "s3", endpoint_url=cfg.endpoint_url or None, config=config
        ),
        "s3",
    )


class S3ObjectStore:
    """Objects under ``s3://{bucket}/{prefix}/`` (``ObjectStore``)."""

    def __init__(self, cfg: S3Config, policy: RetryPolicy, client: S3Client | None = None) -> None:
        self._cfg = cfg
        self._policy = policy
        self._client = client if client is not None else make_s3_client(cfg)
        self._prefix = cfg.prefix.strip("/")

    def full_key(self, key: str) -> str:
        """The bucket key of ``key``: ``{prefix}/{key}``, without a double slash."""
        key = key.lstrip("/")
        return f"{self._prefix}/{key}" if self._prefix else key

    def put(
        self,
        key: str,
        body: bytes | Path,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> None:
        """Write one object; a ``Path`` is streamed from disk.

        Raises:
            TransientError: timeouts, 5xx, SlowDown. PermanentError: other 4xx,
                non-ASCII metadata. ConfigError: credentials refused, bucket missing.
        """
        full = self.full_key(key)
        args = self._put_args(full, content_type, metadata)

        def send() -> None:
            request = args.copy()
            if isinstance(body, Path):
                # Opened per attempt: a failed attempt may have consumed part of
                # the stream, and botocore does not rewind it (no botocore retry).
                with _open(body) as stream:
                    request["Body"] = stream
                    self._client.put_object(**request)
            else:
                request["Body"] = body
                self._client.put_object(**request)

        aws_call(self._policy, "s3.put", send, S3_ERRORS, self.uri(key))

    def delete(self, key: str) -> None:
        """Remove one object (deleting a missing key is not an error in S3).

        Raises:
            As ``put``.
        """
        full = self.full_key(key)
        aws_call(
            self._policy,
            "s3.delete",
            lambda: self._client.delete_object(Bucket=self._cfg.bucket, Key=full),
            S3_ERRORS,
            self.uri(key),
        )

    def ping(self) -> str:
        """Put and delete a probe object: proves the bucket exists and we may write.

        Raises:
            As ``put``.
        """
        # Unique per host and process, so two daemons checking at once never
        # delete each other's probe.
        probe = f"{PROBE_DIR}/{socket.gethostname()}-{os.getpid()}"
        self.put(probe, b"cxrd check\n", "text/plain", {"purpose": "cxrd-check"})
        self.delete(probe)
        return f"{self.uri('')} writable"

    def _put_args(
        self, full_key: str, content_type: str, metadata: Mapping[str, str]
    ) -> PutObjectRequestTypeDef:
        _check_metadata(metadata)
        args: PutObjectRequestTypeDef = {
            "Bucket": self._cfg.bucket,
            "Key": full_key,
            "ContentType": content_type,
            "Metadata": dict(metadata),
        }
        if self._cfg.sse == "AES256":
            args["ServerSideEncryption"] = "AES256"
        elif self._cfg.sse == "aws:kms":
            args["ServerSideEncryption"] = "aws:kms"
            # Without a key id S3 uses the account's aws/s3 managed key.
            if self._cfg.kms_key_id:
                args["SSEKMSKeyId"] = self._cfg.kms_key_id
        return args

    def uri(self, key: str) -> str:
        """``s3://{bucket}/{prefix}/{key}``, for messages and reports read by people."""
        return f"s3://{self._cfg.bucket}/{self.full_key(key)}"


def _open(path: Path) -> BinaryIO:
    """Open a file to upload.

    Raises:
        PermanentError: it cannot be read (the pipeline's own file is missing).
    """
    try:
        return path.open("rb")
    except OSError as exc:
        raise PermanentError(f"s3.put: cannot read {path}: {exc.strerror}", step="s3.put") from exc


def _check_metadata(metadata: Mapping[str, str]) -> None:
    """S3 user metadata travels as HTTP headers, which must be ASCII.

    Raises:
        PermanentError: a key or value is not printable ASCII.
    """
    for name, value in metadata.items():
        for text in (name, value):
            if not (text.isascii() and text.isprintable()):
                raise PermanentError(
                    f"s3.put: metadata {name!r} is not printable ASCII", step="s3.put"
                )
