"""The two model endpoints (``ModelEndpoint``), over one of two backends.

Both speak the SageMaker inference-container contract, so the same model
image serves either way (DESIGN.md "Model endpoints"):

- ``SageMakerEndpoint``: boto3 ``InvokeEndpoint`` on a SageMaker realtime endpoint.
- ``HttpEndpoint``: ``POST {base}/invocations`` and ``GET {base}/ping`` on a
  container run on-prem (or the reference model server).

What the two share lives here once: the 6,291,456-byte request limit, checked
before anything is sent, and the response Content-Type check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import requests

from cxr_daemon.adapters.aws import (
    CONNECT_TIMEOUT_S,
    ErrorTable,
    aws_call,
    client_config,
    create_client,
    new_session,
)
from cxr_daemon.errors import ConfigError, CxrdError, PermanentError, TransientError

if TYPE_CHECKING:
    from mypy_boto3_sagemaker import SageMakerClient
    from mypy_boto3_sagemaker_runtime import SageMakerRuntimeClient

    from cxr_daemon.adapters.retry import RetryPolicy
    from cxr_daemon.config import InferenceConfig
    from cxr_daemon.ports import ModelEndpoint

# SageMaker realtime rejects larger payloads, but only after the upload; the
# http backend enforces the same limit so both backends fail alike.
MAX_REQUEST_BYTES = 6_291_456
# DescribeEndpoint is a metadata call: it answers in well under a second.
CONTROL_READ_TIMEOUT_S = 20.0
INVOKE_STEP = "model.invoke"
PING_STEP = "model.ping"
# An error body is quoted in last_error; a whole HTML page helps nobody.
MAX_ERROR_TEXT = 300
# SageMaker keeps serving the old configuration while an endpoint updates.
SERVING_STATUSES = frozenset({"InService", "Updating", "SystemUpdating"})
COMING_STATUSES = frozenset({"Creating", "RollingBack"})

SAGEMAKER_ERRORS = ErrorTable(
    service="SageMaker",
    transient=frozenset(
        {"ModelNotReadyException", "InternalDependencyException", "ServiceUnavailable"}
    ),
    # The container answered with an error: the same image will get the same answer.
    permanent=frozenset({"ModelError"}),
    # Our requests are fixed in shape, so a validation error means the endpoint
    # name is wrong ("Endpoint cxr-seg of account ... not found").
    config=frozenset({"ValidationError", "ValidationException"}),
)


def check_request_size(body: bytes, endpoint: str) -> None:
    """Refuse a body SageMaker would refuse, before it is sent.

    Raises:
        PermanentError: ``body`` is over 6,291,456 bytes.
    """
    if len(body) > MAX_REQUEST_BYTES:
        raise PermanentError(
            f"{INVOKE_STEP}: request to {endpoint} is {len(body):,} bytes, "
            f"over SageMaker's {MAX_REQUEST_BYTES:,}-byte limit",
            step=INVOKE_STEP,
        )


def check_content_type(got: str, accept: str, endpoint: str) -> None:
    """Check the response media type against ``accept`` (``*/*`` and ``type/*`` allowed).

    Raises:
        PermanentError: the model answered another type ("model contract broken").
    """
    media = got.split(";", 1)[0].strip().lower()
    for wanted in (a.split(";", 1)[0].strip().lower() for a in accept.split(",")):
        if wanted in ("*/*", media) or (wanted.endswith("/*") and media.startswith(wanted[:-1])):
            return
    raise PermanentError(
        f"{INVOKE_STEP}: model contract broken: {endpoint} answered Content-Type "
        f"{got or '(none)'!r}, expected {accept!r}",
        step=INVOKE_STEP,
    )


def make_runtime_client(cfg: InferenceConfig) -> SageMakerRuntimeClient:
    """A ``sagemaker-runtime`` client with botocore retries off and ``timeout_s`` to read.

    Raises:
        ConfigError: the AWS setup is unusable (no region, bad profile).
    """
    config = client_config(cfg.timeout_s)
    return create_client(
        lambda: new_session(cfg.region).client("sagemaker-runtime", config=config),
        "inference",
    )


def make_control_client(cfg: InferenceConfig) -> SageMakerClient:
    """A ``sagemaker`` (control plane) client, for ``DescribeEndpoint`` in ``ping``."""
    config = client_config(CONTROL_READ_TIMEOUT_S)
    return create_client(
        lambda: new_session(cfg.region).client("sagemaker", config=config), "inference"
    )


class SageMakerEndpoint:
    """A SageMaker realtime endpoint, called with ``InvokeEndpoint``."""

    def __init__(
        self,
        endpoint_name: str,
        cfg: InferenceConfig,
        policy: RetryPolicy,
        client: SageMakerRuntimeClient | None = None,
        control_client: SageMakerClient | None = None,
    ) -> None:
        self.name = endpoint_name
        self._policy = policy
        self._runtime = client if client is not None else make_runtime_client(cfg)
        self._control = control_client if control_client is not None else make_control_client(cfg)

    def invoke(self, body: bytes, content_type: str, accept: str) -> bytes:
        """Send one request; return the response body (errors as ``ModelEndpoint.invoke``)."""
        check_request_size(body, self.name)

        def send() -> tuple[str, bytes]:
            response = self._runtime.invoke_endpoint(
                EndpointName=self.name, ContentType=content_type, Accept=accept, Body=body
            )
            # Reading the stream is part of the attempt: a read timeout here is
            # retried like one on the request.
            return response.get("ContentType", ""), response["Body"].read()

        got, data = aws_call(self._policy, INVOKE_STEP, send, SAGEMAKER_ERRORS, self._target)
        check_content_type(got, accept, self.name)
        return data

    def ping(self) -> str:
        """Describe the endpoint; OK while it serves traffic.

        Raises:
            TransientError: being created or rolled back. ConfigError: no such
                endpoint, or it is failed, out of service or being deleted.
        """
        described = aws_call(
            self._policy,
            PING_STEP,
            lambda: self._control.describe_endpoint(EndpointName=self.name),
            SAGEMAKER_ERRORS,
            self._target,
        )
        status = described["EndpointStatus"]
        if status in SERVING_STATUSES:
            return f"SageMaker endpoint {self.name} {status}"
        reason = described.get("FailureReason", "")
        message = f"{PING_STEP}: SageMaker endpoint {self.name} is {status}"
        message += f": {reason}" if reason else ""
        raise (TransientError if status in COMING_STATUSES else ConfigError)(
            message, step=PING_STEP
        )

    @property
    def _target(self) -> str:
        return f"endpoint {self.name}"


class HttpEndpoint:
    """A container behind the SageMaker contract, reached over plain HTTP(S)."""

    def __init__(
        self,
        base_url: str,
        cfg: InferenceConfig,
        policy: RetryPolicy,
        session: requests.Session | None = None,
    ) -> None:
        self.name = base_url.rstrip("/")
        self._policy = policy
        # requests never retries unless told to (HTTPAdapter max_retries=0), so
        # the policy's attempts are the only ones.
        self._session = session if session is not None else requests.Session()
        self._timeout = (CONNECT_TIMEOUT_S, cfg.timeout_s)

    def invoke(self, body: bytes, content_type: str, accept: str) -> bytes:
        """``POST {base}/invocations``; return the body (errors as ``ModelEndpoint.invoke``)."""
        check_request_size(body, self.name)
        headers = {"Content-Type": content_type, "Accept": accept}

        def send() -> tuple[str, bytes]:
            response = self._request("POST", "/invocations", INVOKE_STEP, body, headers)
            return response.headers.get("Content-Type", ""), response.content

        got, data = self._policy.call(INVOKE_STEP, send)
        check_content_type(got, accept, self.name)
        return data

    def ping(self) -> str:
        """``GET {base}/ping``: the container says it is ready.

        Raises:
            TransientError: unreachable, 5xx. ConfigError: 401/403/404, bad URL.
        """
        self._policy.call(PING_STEP, lambda: self._request("GET", "/ping", PING_STEP))
        return f"model server {self.name} ready"

    def _request(
        self,
        method: str,
        path: str,
        step: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        url = self.name + path
        try:
            # Not streamed: the body is read here, so a connection cut mid-body
            # is a requests error too.
            response = self._session.request(
                method, url, data=body, headers=headers, timeout=self._timeout
            )
        except requests.RequestException as exc:
            raise map_requests_error(exc, step, url) from exc
        if response.status_code >= 400:
            raise http_status_error(response.status_code, response.text, step, url)
        return response


def http_status_error(status: int, text: str, step: str, url: str) -> CxrdError:
    """The cxrd error for an HTTP error status from a model container."""
    detail = " ".join(text.split())[:MAX_ERROR_TEXT] or "no body"
    message = f"{step}: {url} answered HTTP {status}: {detail}"
    if status == 424:
        return PermanentError(f"{step}: model error from {url}: {detail}", step=step, status=status)
    if status in (401, 403):
        return ConfigError(message, step=step, status=status)
    if status == 404:
        # The container contract has exactly two paths: a 404 means the base
        # URL in [inference] is wrong, like a missing SageMaker endpoint.
        return ConfigError(
            f"{step}: no model at {url} (check [inference]): HTTP 404: {detail}",
            step=step,
            status=status,
        )
    if status in (408, 429) or status >= 500:
        return TransientError(message, step=step, status=status)
    return PermanentError(message, step=step, status=status)


def map_requests_error(exc: requests.RequestException, step: str, url: str) -> CxrdError:
    """The cxrd error for a requests exception (no HTTP status was received)."""
    message = f"{step}: {url}: {type(exc).__name__}: {exc}"
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return ConfigError(message, step=step)
    if isinstance(exc, requests.exceptions.InvalidSchema | requests.exceptions.InvalidHeader):
        return ConfigError(message, step=step)
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return PermanentError(message, step=step)
    # Timeouts, refused or reset connections, truncated bodies.
    return TransientError(message, step=step)


def build_endpoints(
    cfg: InferenceConfig, policy: RetryPolicy
) -> tuple[ModelEndpoint, ModelEndpoint]:
    """(segmentation, classification) on the backend ``cfg.backend`` names.

    Raises:
        ConfigError: the AWS client cannot be created.
    """
    if cfg.backend == "http":
        session = requests.Session()  # one connection pool for both models
        return (
            HttpEndpoint(cfg.segmentation_endpoint, cfg, policy, session),
            HttpEndpoint(cfg.classification_endpoint, cfg, policy, session),
        )
    # boto3 clients are thread-safe: one pair serves both endpoints and all workers.
    runtime, control = make_runtime_client(cfg), make_control_client(cfg)
    return (
        SageMakerEndpoint(cfg.segmentation_endpoint, cfg, policy, runtime, control),
        SageMakerEndpoint(cfg.classification_endpoint, cfg, policy, runtime, control),
    )
