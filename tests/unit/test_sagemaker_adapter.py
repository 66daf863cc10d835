"""The model endpoints: SageMaker (Stubber, a local server) and http (responses, a local server)."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, ClassVar

import boto3
import pytest
import requests
import responses
from botocore.response import StreamingBody
from botocore.stub import Stubber

from cxr_daemon.adapters.aws import client_config
from cxr_daemon.adapters.sagemaker import (
    MAX_REQUEST_BYTES,
    HttpEndpoint,
    SageMakerEndpoint,
    build_endpoints,
    make_runtime_client,
)
from cxr_daemon.config import InferenceConfig
from cxr_daemon.errors import ConfigError, PermanentError, TransientError
from cxr_daemon.ports import ModelEndpoint
from tests.support.aws import REGION, fast_policy, isolate_from_aws
from tests.support.httpserver import local_http_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

CFG = InferenceConfig(region=REGION, timeout_s=5)
BASE = "http://models.test:8080/segmentation"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_from_aws(monkeypatch, tmp_path)


# -- SageMaker backend -------------------------------------------------------------


@pytest.fixture
def sagemaker() -> Iterator[tuple[SageMakerEndpoint, Stubber, Stubber]]:
    endpoint = SageMakerEndpoint("cxr-seg", CFG, fast_policy())
    with Stubber(endpoint._runtime) as runtime, Stubber(endpoint._control) as control:
        yield endpoint, runtime, control


def invoke_response(body: bytes, content_type: str) -> dict[str, object]:
    return {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": content_type}


def test_sagemaker_invoke_returns_the_body(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
) -> None:
    """InvokeEndpoint gets the endpoint name, both media types and the body; returns the answer."""
    endpoint, runtime, _ = sagemaker
    runtime.add_response(
        "invoke_endpoint",
        invoke_response(b'{"findings": []}', "application/json"),
        {
            "EndpointName": "cxr-seg",
            "ContentType": "image/png",
            "Accept": "application/json",
            "Body": PNG,
        },
    )
    assert endpoint.invoke(PNG, "image/png", "application/json") == b'{"findings": []}'
    assert endpoint.name == "cxr-seg"


def test_sagemaker_media_type_parameters_are_ignored(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
) -> None:
    """A response "application/json; charset=utf-8" satisfies Accept "application/json"."""
    endpoint, runtime, _ = sagemaker
    runtime.add_response(
        "invoke_endpoint", invoke_response(b"{}", "application/json; charset=utf-8")
    )
    assert endpoint.invoke(PNG, "image/png", "application/json") == b"{}"


def test_sagemaker_wrong_content_type_breaks_the_contract(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
) -> None:
    """A response whose Content-Type is not the Accept type fails the study."""
    endpoint, runtime, _ = sagemaker
    runtime.add_response("invoke_endpoint", invoke_response(b"<html>", "text/html"))
    with pytest.raises(PermanentError, match=r"model contract broken.*text/html"):
        endpoint.invoke(PNG, "image/png", "image/png")


def test_sagemaker_oversize_body_is_never_sent(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
) -> None:
    """A body of 6,291,457 bytes fails before any request, naming SageMaker's limit."""
    endpoint, _, _ = sagemaker
    with pytest.raises(PermanentError, match="over SageMaker's 6,291,456-byte limit"):
        endpoint.invoke(b"\x00" * (MAX_REQUEST_BYTES + 1), "image/png", "image/png")


def test_sagemaker_body_at_the_limit_is_sent(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
) -> None:
    """A body of exactly 6,291,456 bytes is allowed."""
    endpoint, runtime, _ = sagemaker
    runtime.add_response("invoke_endpoint", invoke_response(PNG, "image/png"))
    assert endpoint.invoke(b"\x00" * MAX_REQUEST_BYTES, "image/png", "image/png") == PNG


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("ModelError", 424, PermanentError),
        ("ServiceUnavailable", 503, TransientError),
        ("ModelNotReadyException", 429, TransientError),
        ("ThrottlingException", 400, TransientError),
        ("InternalFailure", 500, TransientError),
        ("InternalDependencyException", 530, TransientError),
        ("ValidationError", 400, ConfigError),
        ("AccessDeniedException", 403, ConfigError),
        ("UnrecognizedClientException", 403, ConfigError),
    ],
)
def test_sagemaker_error_mapping(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
    code: str,
    status: int,
    kind: type[Exception],
) -> None:
    """Each InvokeEndpoint error maps to one kind and names the endpoint; transient ones retry."""
    endpoint, runtime, _ = sagemaker
    for _ in range(3 if kind is TransientError else 1):
        runtime.add_client_error(
            "invoke_endpoint", code, "the model says no", http_status_code=status
        )
    with pytest.raises(kind, match=rf"{code}.*endpoint cxr-seg: the model says no") as info:
        endpoint.invoke(PNG, "image/png", "image/png")
    assert type(info.value) is kind
    runtime.assert_no_pending_responses()


def describe(status: str, reason: str = "") -> dict[str, object]:
    now = datetime.now(UTC)
    answer: dict[str, object] = {
        "EndpointName": "cxr-seg",
        "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/cxr-seg",
        "EndpointStatus": status,
        "CreationTime": now,
        "LastModifiedTime": now,
    }
    if reason:
        answer["FailureReason"] = reason
    return answer


@pytest.mark.parametrize("status", ["InService", "Updating"])
def test_sagemaker_ping_ok_while_serving(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber], status: str
) -> None:
    """ping describes the endpoint and is OK while it serves traffic."""
    endpoint, _, control = sagemaker
    control.add_response("describe_endpoint", describe(status), {"EndpointName": "cxr-seg"})
    assert endpoint.ping() == f"SageMaker endpoint cxr-seg {status}"


@pytest.mark.parametrize(
    ("status", "kind"),
    [("Failed", ConfigError), ("OutOfService", ConfigError), ("Creating", TransientError)],
)
def test_sagemaker_ping_fails_with_the_reason(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber], status: str, kind: type[Exception]
) -> None:
    """An endpoint not in service fails ping with its status and FailureReason."""
    endpoint, _, control = sagemaker
    control.add_response("describe_endpoint", describe(status, "image pull failed"))
    with pytest.raises(kind, match=f"cxr-seg is {status}: image pull failed"):
        endpoint.ping()


def test_sagemaker_ping_unknown_endpoint_is_config(
    sagemaker: tuple[SageMakerEndpoint, Stubber, Stubber],
) -> None:
    """DescribeEndpoint of a missing endpoint is a ConfigError naming it."""
    endpoint, _, control = sagemaker
    control.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint")
    with pytest.raises(ConfigError, match="endpoint cxr-seg: Could not find endpoint"):
        endpoint.ping()


def test_runtime_client_makes_one_http_attempt_per_call() -> None:
    """botocore's own retries are off and the read timeout is inference.timeout_s."""
    client = make_runtime_client(InferenceConfig(region=REGION, timeout_s=70))
    retries = client.meta.config.retries  # type: ignore[attr-defined]
    assert retries == {"total_max_attempts": 1, "mode": "standard"}
    assert client.meta.config.read_timeout == 70  # type: ignore[attr-defined]


# -- http backend (responses) ------------------------------------------------------


@pytest.fixture
def http() -> HttpEndpoint:
    return HttpEndpoint(BASE + "/", CFG, fast_policy(), requests.Session())


@responses.activate
def test_http_invoke_posts_to_invocations(http: HttpEndpoint) -> None:
    """invoke POSTs the body with Content-Type and Accept to {base}/invocations."""
    responses.post(
        f"{BASE}/invocations",
        body=PNG,
        content_type="image/png",
        match=[
            responses.matchers.header_matcher({"Content-Type": "image/png", "Accept": "image/png"}),
            lambda request: (request.body == PNG, "body differs"),
        ],
    )
    assert http.invoke(PNG, "image/png", "image/png") == PNG
    assert http.name == BASE


@responses.activate
def test_http_ping(http: HttpEndpoint) -> None:
    """ping GETs {base}/ping and reports the model server ready."""
    responses.get(f"{BASE}/ping", body="")
    assert http.ping() == f"model server {BASE} ready"


@responses.activate
def test_http_ping_unreachable_is_transient(http: HttpEndpoint) -> None:
    """A ping that cannot connect is a TransientError."""
    responses.get(f"{BASE}/ping", body=requests.ConnectionError("refused"))
    with pytest.raises(TransientError, match="refused"):
        http.ping()


@responses.activate
def test_http_503_then_200_is_retried_and_succeeds(http: HttpEndpoint) -> None:
    """A transient 503 is retried within the call and the second answer returned."""
    responses.post(f"{BASE}/invocations", status=503, body="busy")
    responses.post(f"{BASE}/invocations", body=b"{}", content_type="application/json")
    assert http.invoke(PNG, "image/png", "application/json") == b"{}"


@pytest.mark.parametrize(
    ("status", "kind", "text"),
    [
        (424, PermanentError, "model error"),
        (400, PermanentError, "HTTP 400"),
        (415, PermanentError, "HTTP 415"),
        (401, ConfigError, "HTTP 401"),
        (403, ConfigError, "HTTP 403"),
        (404, ConfigError, "no model at .*HTTP 404"),
        (408, TransientError, "HTTP 408"),
        (429, TransientError, "HTTP 429"),
        (500, TransientError, "HTTP 500"),
        (503, TransientError, "HTTP 503"),
    ],
)
@responses.activate
def test_http_status_mapping(
    http: HttpEndpoint, status: int, kind: type[Exception], text: str
) -> None:
    """Each status maps to one kind, quoting the body; transient ones are retried."""
    responses.post(f"{BASE}/invocations", status=status, body="cannot decode image")
    with pytest.raises(kind, match=f"{text}.*cannot decode image") as info:
        http.invoke(PNG, "image/png", "image/png")
    assert type(info.value) is kind
    assert len(responses.calls) == (3 if kind is TransientError else 1)


@pytest.mark.parametrize(
    "exc", [requests.ConnectionError("reset"), requests.ReadTimeout("read timed out")]
)
@responses.activate
def test_http_connection_errors_are_transient(http: HttpEndpoint, exc: Exception) -> None:
    """Connection failures and timeouts are TransientError after the policy's attempts."""
    responses.post(f"{BASE}/invocations", body=exc)
    with pytest.raises(TransientError):
        http.invoke(PNG, "image/png", "image/png")
    assert len(responses.calls) == 3


@responses.activate
def test_http_wrong_content_type_breaks_the_contract(http: HttpEndpoint) -> None:
    """A JSON request answered with a PNG fails the study."""
    responses.post(f"{BASE}/invocations", body=PNG, content_type="image/png")
    with pytest.raises(PermanentError, match="model contract broken"):
        http.invoke(PNG, "image/png", "application/json")


@responses.activate
def test_http_oversize_body_is_never_sent(http: HttpEndpoint) -> None:
    """A body of 6,291,457 bytes fails with the limit and makes no HTTP call."""
    responses.post(f"{BASE}/invocations", body=b"{}", content_type="application/json")
    with pytest.raises(PermanentError, match="over SageMaker's 6,291,456-byte limit"):
        http.invoke(b"\x00" * (MAX_REQUEST_BYTES + 1), "image/png", "application/json")
    assert len(responses.calls) == 0


def test_http_bad_url_is_config() -> None:
    """A base URL without a scheme stops cxrd (ConfigError)."""
    with pytest.raises(ConfigError):
        HttpEndpoint("models:8080", CFG, fast_policy()).ping()


# -- real local servers ------------------------------------------------------------


class _Server(BaseHTTPRequestHandler):
    """Answers every request with ``status`` after ``delay_s``; counts requests."""

    protocol_version = "HTTP/1.1"
    hits = 0
    status = 503
    delay_s = 0.0
    headers_out: ClassVar[dict[str, str]] = {}
    body = b'{"message": "busy"}'

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).hits += 1
        time.sleep(self.delay_s)
        self.send_response(self.status)
        for name, value in self.headers_out.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Server]]]:
    handler = type("Handler", (_Server,), {"hits": 0})
    with local_http_server(handler) as url:
        yield url, handler


def test_http_503_makes_exactly_the_policy_attempts(server: tuple[str, type[_Server]]) -> None:
    """A container that always answers 503 sees exactly 3 requests."""
    url, handler = server
    with pytest.raises(TransientError, match="HTTP 503"):
        HttpEndpoint(url, CFG, fast_policy()).invoke(PNG, "image/png", "image/png")
    assert handler.hits == 3


def test_http_read_timeout_is_transient(server: tuple[str, type[_Server]]) -> None:
    """A container slower than inference.timeout_s is a TransientError (read timeout)."""
    url, handler = server
    handler.status, handler.delay_s = 200, 0.3
    with pytest.raises(TransientError, match="ReadTimeout"):
        HttpEndpoint(url, InferenceConfig(timeout_s=0.1), fast_policy()).invoke(
            PNG, "image/png", "image/png"
        )
    assert handler.hits == 3


def test_sagemaker_throttling_makes_exactly_the_policy_attempts(
    server: tuple[str, type[_Server]],
) -> None:
    """Against a real socket, a throttled InvokeEndpoint is sent 3 times, not 3 x botocore's 3."""
    url, handler = server
    handler.status = 400
    handler.headers_out = {
        "x-amzn-ErrorType": "ThrottlingException",
        "Content-Type": "application/json",
    }
    handler.body = json.dumps({"message": "Rate exceeded"}).encode()
    client = boto3.session.Session(region_name=REGION).client(
        "sagemaker-runtime", endpoint_url=url, config=client_config(5.0)
    )
    endpoint = SageMakerEndpoint("cxr-seg", CFG, fast_policy(), client=client)
    with pytest.raises(TransientError, match=r"ThrottlingException.*Rate exceeded"):
        endpoint.invoke(PNG, "image/png", "image/png")
    assert handler.hits == 3


# -- building ----------------------------------------------------------------------


def test_build_endpoints_http() -> None:
    """backend "http" gives two HttpEndpoints on the configured base URLs."""
    cfg = InferenceConfig(
        backend="http",
        segmentation_endpoint="http://127.0.0.1:8080/segmentation",
        classification_endpoint="http://127.0.0.1:8080/classification",
    )
    seg, cls = build_endpoints(cfg, fast_policy())
    direct: ModelEndpoint = HttpEndpoint("http://x", cfg, fast_policy())  # mypy checks the protocol
    assert direct.name == "http://x"
    assert isinstance(seg, HttpEndpoint)
    assert isinstance(cls, HttpEndpoint)
    assert (seg.name, cls.name) == (cfg.segmentation_endpoint, cfg.classification_endpoint)


def test_build_endpoints_sagemaker() -> None:
    """backend "sagemaker" gives two SageMakerEndpoints named after the endpoints."""
    seg, cls = build_endpoints(CFG, fast_policy())
    direct: ModelEndpoint = SageMakerEndpoint("x", CFG, fast_policy())  # mypy checks the protocol
    assert direct.name == "x"
    assert isinstance(seg, SageMakerEndpoint)
    assert isinstance(cls, SageMakerEndpoint)
    assert (seg.name, cls.name) == ("cxr-seg", "cxr-cls")
