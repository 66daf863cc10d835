"""Report drafting: Bedrock Converse (Stubber, a local fake), the template and none backends."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

import pytest
from botocore.stub import Stubber

from cxr_daemon.adapters.bedrock import (
    PING_PROMPT,
    BedrockReporter,
    NoReporter,
    PromptTemplate,
    TemplateReporter,
    build_reporter,
)
from cxr_daemon.config import ReportConfig
from cxr_daemon.errors import ConfigError, PermanentError, TransientError
from cxr_daemon.ports import FindingRecord, Reporter, ReportRecord, ReportRequest
from tests.support.aws import fast_policy, isolate_from_aws
from tests.support.converse import FakeConverse

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
CFG = ReportConfig(backend="bedrock", model_id=MODEL, region="us-east-1", max_tokens=1024)
SOP1, SOP2 = "1.2.840.99999.1.1", "1.2.840.99999.1.2"
REQUEST = ReportRequest(
    view="PA",
    image_count=2,
    findings=(
        FindingRecord(SOP1, "Nodule", 0.12, None),
        FindingRecord(SOP1, "Effusion", 0.72, (10, 20, 200, 300)),
        FindingRecord(SOP2, "Cardiomegaly", 0.5, None),
        FindingRecord(SOP2, "Effusion", 0.64, (12, 22, 190, 280)),
    ),
)
ANSWER = {
    "output": {
        "message": {"role": "assistant", "content": [{"text": "FINDINGS: ...\nIMPRESSION: ..."}]}
    },
    "stopReason": "end_turn",
    "usage": {"inputTokens": 321, "outputTokens": 45, "totalTokens": 366},
    "metrics": {"latencyMs": 900},
}


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_from_aws(monkeypatch, tmp_path)


def stubbed(cfg: ReportConfig = CFG) -> tuple[BedrockReporter, Stubber]:
    reporter = BedrockReporter(cfg, fast_policy())
    _: Reporter = reporter  # mypy checks the protocol
    return reporter, Stubber(reporter._client)


def expected_params(cfg: ReportConfig, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "modelId": cfg.model_id,
        "system": [{"text": PromptTemplate.load().system}],
        "messages": [{"role": "user", "content": [{"text": prompt}]}],
        "inferenceConfig": {"maxTokens": max_tokens, "temperature": 0},
    }


# -- Bedrock -----------------------------------------------------------------------


def test_draft_returns_the_answer_with_usage_and_prompt_hash() -> None:
    """Converse gets the system text, the prompt and temperature 0; the record holds the answer."""
    reporter, stub = stubbed()
    prompt = PromptTemplate.load().render(REQUEST)
    stub.add_response("converse", ANSWER, expected_params(CFG, prompt, 1024))
    with stub:
        record = reporter.draft(REQUEST)
    assert record == ReportRecord(
        text="FINDINGS: ...\nIMPRESSION: ...",
        model_id=MODEL,
        input_tokens=321,
        output_tokens=45,
        stop_reason="end_turn",
        prompt_hash=reporter.prompt_hash,
    )


def test_prompt_holds_the_findings_table_and_nothing_else() -> None:
    """The prompt has view, image count and label/probability/bbox rows; no UID reaches it."""
    prompt = PromptTemplate.load().render(REQUEST)
    assert "View: PA" in prompt
    assert "Number of images: 2" in prompt
    assert "| 1 | Effusion | 0.72 | 10,20,200,300 |" in prompt
    assert "| 2 | Cardiomegaly | 0.50 | - |" in prompt
    assert "| 1 | Nodule | 0.12 | - |" in prompt
    assert SOP1 not in prompt
    assert SOP2 not in prompt
    assert "$" not in prompt


def test_guardrail_is_sent_when_id_and_version_are_set() -> None:
    """guardrailConfig carries the configured id and version."""
    cfg = ReportConfig(model_id=MODEL, guardrail_id="gr-123", guardrail_version="2")
    reporter, stub = stubbed(cfg)
    params = expected_params(cfg, PromptTemplate.load().render(REQUEST), 1024)
    params["guardrailConfig"] = {"guardrailIdentifier": "gr-123", "guardrailVersion": "2"}
    stub.add_response("converse", ANSWER, params)
    with stub:
        reporter.draft(REQUEST)


def test_guardrail_is_not_sent_with_only_an_id() -> None:
    """Without a guardrail version no guardrailConfig is sent."""
    cfg = ReportConfig(model_id=MODEL, guardrail_id="gr-123")
    reporter, stub = stubbed(cfg)
    stub.add_response(
        "converse", ANSWER, expected_params(cfg, PromptTemplate.load().render(REQUEST), 1024)
    )
    with stub:
        reporter.draft(REQUEST)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("ThrottlingException", 429, TransientError),
        ("ServiceUnavailableException", 503, TransientError),
        ("ModelTimeoutException", 408, TransientError),
        ("InternalServerException", 500, TransientError),
        ("ModelNotReadyException", 429, TransientError),
        ("ValidationException", 400, PermanentError),
        ("AccessDeniedException", 403, ConfigError),
        ("ResourceNotFoundException", 404, ConfigError),
        ("UnrecognizedClientException", 403, ConfigError),
    ],
)
def test_error_mapping(code: str, status: int, kind: type[Exception]) -> None:
    """Each Converse error maps to one kind, naming the model; transient ones are retried."""
    reporter, stub = stubbed()
    for _ in range(3 if kind is TransientError else 1):
        stub.add_client_error("converse", code, "no", http_status_code=status)
    with stub, pytest.raises(kind, match=rf"{code}.*model {MODEL}: no") as info:
        reporter.draft(REQUEST)
    assert type(info.value) is kind
    stub.assert_no_pending_responses()


def test_answer_without_text_breaks_the_contract() -> None:
    """An answer with no text block fails the study."""
    reporter, stub = stubbed()
    empty = {**ANSWER, "output": {"message": {"role": "assistant", "content": []}}}
    stub.add_response("converse", empty)
    with stub, pytest.raises(PermanentError, match="model contract broken"):
        reporter.draft(REQUEST)


def test_ping_is_a_one_token_converse_on_a_fixed_prompt() -> None:
    """ping asks for one token on a fixed prompt that holds no study data."""
    reporter, stub = stubbed()
    stub.add_response(
        "converse", {**ANSWER, "stopReason": "max_tokens"}, expected_params(CFG, PING_PROMPT, 1)
    )
    with stub:
        assert reporter.ping() == f"Bedrock model {MODEL} answered (max_tokens)"


def test_prompt_hash_is_the_versioned_sha256_of_the_template_file() -> None:
    """prompt_hash is "report_v1:" + the first 16 hex digits of the file's sha256."""
    raw = resources.files("cxr_daemon").joinpath("prompts", "report_v1.txt").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    assert BedrockReporter(CFG, fast_policy()).prompt_hash == f"report_v1:{digest}"


def test_template_comments_are_not_sent() -> None:
    """Comment lines of the prompt file stay out of the system and user text."""
    template = PromptTemplate.load()
    assert "#" not in template.system
    assert template.system.startswith("You draft preliminary chest X-ray reports")


# -- a local fake Bedrock (endpoint_url) --------------------------------------------


@pytest.fixture
def fake_bedrock() -> Iterator[FakeConverse]:
    with FakeConverse(ANSWER) as fake:
        yield fake


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_request_on_the_wire_has_findings_and_no_phi(
    fake_bedrock: FakeConverse,
) -> None:
    """The exact HTTP body has only Converse fields, the findings, and no UID or patient field."""
    url, handler = fake_bedrock.url, fake_bedrock
    reporter = BedrockReporter(ReportConfig(model_id=MODEL, endpoint_url=url), fast_policy())
    assert reporter.draft(REQUEST).text.startswith("FINDINGS:")
    (raw,) = handler.bodies
    body = json.loads(raw)
    assert _keys(body) == {
        "system",
        "messages",
        "inferenceConfig",
        "text",
        "role",
        "content",
        "maxTokens",
        "temperature",
    }
    assert body["system"] == [{"text": PromptTemplate.load().system}]
    text = body["messages"][0]["content"][0]["text"]
    assert "| 1 | Effusion | 0.72 | 10,20,200,300 |" in text
    assert SOP1.encode() not in raw
    assert SOP2.encode() not in raw
    for word in ("patient", "accession", "birth", "name", "date"):
        assert word not in text.lower()


def test_unavailable_bedrock_makes_exactly_the_policy_attempts(
    fake_bedrock: FakeConverse,
) -> None:
    """A Bedrock that always answers 503 sees exactly 3 requests."""
    url, handler = fake_bedrock.url, fake_bedrock
    handler.status = 503
    reporter = BedrockReporter(ReportConfig(model_id=MODEL, endpoint_url=url), fast_policy())
    with pytest.raises(TransientError, match="ServiceUnavailableException"):
        reporter.draft(REQUEST)
    assert len(handler.bodies) == 3


# -- template and none -----------------------------------------------------------------


def test_template_report_is_deterministic_and_summarises_first() -> None:
    """The template draft is the same every time; its first line lists findings at or above 0.5."""
    reporter: Reporter = TemplateReporter()  # mypy checks the protocol
    first = reporter.draft(REQUEST)
    assert first is not None
    assert first == TemplateReporter().draft(REQUEST)
    summary = first.text.splitlines()[0]
    assert summary == (
        "Draft (automated, template): PA view, 2 images. "
        "Findings at or above 0.50: Effusion (0.72), Cardiomegaly (0.50)."
    )
    assert "Nodule (0.12)" in first.text
    assert "Effusion: 0.64, image 2, region x 12-190, y 22-280" in first.text
    assert SOP1 not in first.text
    assert first.prompt_hash == "template_v1"


def test_template_report_without_findings() -> None:
    """No finding at or above the threshold is said on the first line."""
    request = ReportRequest(
        view="AP", image_count=1, findings=(FindingRecord(SOP1, "Nodule", 0.2),)
    )
    text = TemplateReporter(prompt_hash="tpl:1").draft(request).text
    assert (
        text.splitlines()[0]
        == "Draft (automated, template): AP view, 1 image. No finding at or above 0.50."
    )


def test_no_reporter_drafts_nothing() -> None:
    """The none backend returns None and needs nothing to ping."""
    reporter: Reporter = NoReporter()
    assert reporter.draft(REQUEST) is None
    assert "none" in reporter.ping()


@pytest.mark.parametrize(
    ("backend", "kind"),
    [("bedrock", BedrockReporter), ("template", TemplateReporter), ("none", NoReporter)],
)
def test_build_reporter_follows_the_backend(backend: str, kind: type) -> None:
    """build_reporter returns the reporter report.backend names."""
    assert isinstance(build_reporter(ReportConfig(backend=backend), fast_policy()), kind)


def test_guardrail_intervention_fails_instead_of_storing_the_canned_text() -> None:
    """stopReason guardrail_intervened is a permanent failure, not a report."""
    blocked = {**ANSWER, "stopReason": "guardrail_intervened"}
    with FakeConverse(blocked) as fake:
        cfg = ReportConfig(backend="bedrock", model_id=MODEL, endpoint_url=fake.url)
        with pytest.raises(PermanentError, match="guardrail blocked"):
            BedrockReporter(cfg, fast_policy()).draft(REQUEST)
