"""What the three AWS adapters (S3, SageMaker, Bedrock) share.

- ``client_config``: botocore's own retries are turned off (one HTTP attempt
  per call), because ``RetryPolicy`` is the one retry layer. botocore 1.44
  defaults to 3 attempts in ``standard`` mode, and tenacity(3) on top of that
  made 12 HTTP attempts on throttling (FACTS.md); for an inference call every
  extra attempt is a second inference.
- ``map_aws_error``: the one table from botocore exceptions to the cxrd error
  tree (STYLE.md §3), with per-service extra codes in an ``ErrorTable``.
- ``aws_call``: run one SDK call under the retry policy, translating errors
  inside the retried function so ``TransientError`` is what tenacity sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConfigNotFound,
    ConfigParseError,
    CredentialRetrievalError,
    EndpointProviderError,
    HTTPClientError,
    IncompleteReadError,
    InvalidConfigError,
    LoginError,
    NoAuthTokenError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOError,
    TokenRetrievalError,
    UnknownCredentialError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cxr_daemon.errors import ConfigError, CxrdError, PermanentError, TransientError

if TYPE_CHECKING:
    from collections.abc import Callable

    from cxr_daemon.adapters.retry import RetryPolicy

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0

# Codes that mean the same thing on every AWS service.
COMMON_TRANSIENT = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "ProvisionedThroughputExceededException",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "InternalServerException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
COMMON_CONFIG = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "IncompleteSignature",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "NotAuthorized",
        "AuthFailure",
        "RequestTimeTooSkewed",
        "InvalidSignatureException",
    }
)

# Connection-level failures: the request may not have arrived, or the answer
# was cut off; the same call can succeed a moment later.
_TRANSIENT_BOTOCORE: tuple[type[BotoCoreError], ...] = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError, proxy
    HTTPClientError,  # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError
    IncompleteReadError,
    ChecksumError,
)
# The process has no usable credentials, region or profile: nothing will work
# until the operator fixes the host, so cxrd must stop and say so.
_CONFIG_BOTOCORE: tuple[type[BotoCoreError], ...] = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    UnknownCredentialError,
    NoAuthTokenError,
    TokenRetrievalError,
    SSOError,
    LoginError,
    NoRegionError,
    ProfileNotFound,
    ConfigNotFound,
    ConfigParseError,
    InvalidConfigError,
    EndpointProviderError,
)


@dataclass(frozen=True)
class ErrorTable:
    """A service's error codes on top of the common ones.

    ``config`` wins over ``permanent``, which wins over ``transient``; codes in
    none of them fall back to the HTTP status.
    """

    service: str
    transient: frozenset[str] = frozenset()
    permanent: frozenset[str] = frozenset()
    config: frozenset[str] = frozenset()


def client_config(read_timeout_s: float) -> Config:
    """A botocore ``Config`` with a single HTTP attempt per call and our timeouts."""
    return Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=read_timeout_s,
    )


def new_session(region: str) -> boto3.session.Session:
    """A private boto3 session: the module-level default one is not thread-safe."""
    return boto3.session.Session(region_name=region or None)


def create_client(make: Callable[[], T], what: str) -> T:
    """Build a client with ``make``; a bad endpoint URL or AWS setup is a ``ConfigError``."""
    try:
        return make()
    except (ValueError, BotoCoreError) as exc:
        raise ConfigError(f"{what}: cannot create the AWS client: {exc}") from exc


def map_aws_error(
    exc: ClientError | BotoCoreError, step: str, table: ErrorTable, target: str = ""
) -> CxrdError:
    """Translate one botocore exception into the cxrd error tree.

    The message names the step, the service, the error code and HTTP status
    and ``target`` (a bucket key, an endpoint, a model), because it becomes
    the study's ``last_error``.
    """
    where = f" for {target}" if target else ""
    if isinstance(exc, ClientError):
        return _map_client_error(exc, step, table, where)
    message = f"{step}: {table.service}{where}: {exc}"
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        return TransientError(message, step=step)
    if isinstance(exc, _CONFIG_BOTOCORE):
        return ConfigError(message, step=step)
    # ParamValidationError and the like: the request itself is wrong.
    return PermanentError(message, step=step)


def _map_client_error(exc: ClientError, step: str, table: ErrorTable, where: str) -> CxrdError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    detail = str(error.get("Message", "")) or "no message"
    status_text = f" (HTTP {status})" if status else ""
    message = f"{step}: {table.service} {code or 'error'}{status_text}{where}: {detail}"
    kind = _classify(code, status, table)
    return kind(message, step=step, status=status)


def _classify(code: str, status: int | None, table: ErrorTable) -> type[CxrdError]:
    if code in table.config or code in COMMON_CONFIG:
        return ConfigError
    if code in table.permanent:
        return PermanentError
    if code in table.transient or code in COMMON_TRANSIENT:
        return TransientError
    if status in (401, 403):
        return ConfigError
    if status is not None and (status in (408, 429) or status >= 500):
        return TransientError
    return PermanentError


def aws_call(
    policy: RetryPolicy,
    step: str,
    fn: Callable[[], T],
    table: ErrorTable,
    target: str = "",
) -> T:
    """Run ``fn`` under ``policy``; botocore errors become cxrd errors inside each attempt.

    Raises:
        TransientError: still failing after the policy's attempts.
        PermanentError, ConfigError: at once, never retried.
    """

    def attempt() -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise map_aws_error(exc, step, table, target) from exc

    return policy.call(step, attempt)
