"""Draft reports (``Reporter``): Bedrock Converse, a fixed template, or none.

The prompt is built from ``cxr_daemon/prompts/report_v1.txt`` and the
``ReportRequest`` alone (view, image count, findings), which holds no PHI; this
module adds nothing else, not even SOPInstanceUIDs (images are numbered).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from cxr_daemon.adapters.aws import ErrorTable, aws_call, client_config, create_client, new_session
from cxr_daemon.errors import ConfigError, PermanentError
from cxr_daemon.ports import FindingRecord, ReportRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mypy_boto3_bedrock_runtime import BedrockRuntimeClient
    from mypy_boto3_bedrock_runtime.type_defs import ConverseRequestTypeDef, ConverseResponseTypeDef

    from cxr_daemon.adapters.retry import RetryPolicy
    from cxr_daemon.config import ReportConfig
    from cxr_daemon.ports import Reporter, ReportRequest

PROMPT_VERSION = "report_v1"
DRAFT_STEP = "report.draft"
PING_STEP = "report.ping"
# A 1,024-token answer from a large model takes tens of seconds; two minutes
# without a byte means the call is stuck.
READ_TIMEOUT_S = 120.0
THRESHOLD = 0.5
TEMPLATE_VERSION = "template_v1"
# Fixed and free of study data: ping proves model access, not prompt quality.
PING_PROMPT = "Reply with the single word OK."

BEDROCK_ERRORS = ErrorTable(
    service="Bedrock",
    transient=frozenset(
        {"ModelTimeoutException", "ModelNotReadyException", "ServiceQuotaExceededException"}
    ),
    permanent=frozenset({"ValidationException"}),
    # ResourceNotFound: the model id is wrong or not enabled in this region.
    config=frozenset({"ResourceNotFoundException"}),
)


@dataclass(frozen=True)
class PromptTemplate:
    """A versioned prompt: system text and a ``string.Template`` for the user turn."""

    version: str
    system: str
    user: string.Template
    hash: str

    @classmethod
    def load(cls, version: str = PROMPT_VERSION) -> PromptTemplate:
        """Read ``cxr_daemon/prompts/{version}.txt`` shipped with the package.

        Raises:
            ConfigError: the file is missing or malformed (a broken install).
        """
        where = f"cxr_daemon/prompts/{version}.txt"
        try:
            raw = resources.files("cxr_daemon").joinpath("prompts", f"{version}.txt").read_bytes()
        except OSError as exc:
            raise ConfigError(f"report: cannot read prompt {where}: {exc}") from exc
        system, user = _split_sections(raw.decode("utf-8"), where)
        digest = hashlib.sha256(raw).hexdigest()[:16]
        return cls(version, system, string.Template(user), f"{version}:{digest}")

    def render(self, request: ReportRequest) -> str:
        """The user turn for ``request``: view, image count and findings table only."""
        return self.user.substitute(
            view=_clean(request.view) or "unknown",
            image_count=request.image_count,
            findings=findings_table(request.findings),
        )


def _split_sections(text: str, where: str) -> tuple[str, str]:
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    try:
        system_at, user_at = lines.index("[system]"), lines.index("[user]")
    except ValueError:
        raise ConfigError(f"report: prompt {where} needs [system] and [user] lines") from None
    system = "\n".join(lines[system_at + 1 : user_at]).strip()
    user = "\n".join(lines[user_at + 1 :]).strip()
    return system, user


def _clean(text: str) -> str:
    """One line, no table separators: model labels are free text."""
    return " ".join(text.split()).replace("|", "/")


def _ordered(findings: Sequence[FindingRecord]) -> list[tuple[int, FindingRecord]]:
    """Findings with their image number (1-based, by first appearance), most likely first."""
    numbers: dict[str, int] = {}
    for finding in findings:
        numbers.setdefault(finding.sop_uid, len(numbers) + 1)
    numbered = [(numbers[f.sop_uid], f) for f in findings]
    return sorted(numbered, key=lambda item: (-item[1].probability, item[1].label, item[0]))


def _bbox(bbox: tuple[int, int, int, int] | None) -> str:
    return ",".join(str(v) for v in bbox) if bbox else "-"


def findings_table(findings: Sequence[FindingRecord]) -> str:
    """A Markdown table of image number, label, probability and bbox (nothing else)."""
    if not findings:
        return "(the models reported no findings)"
    rows = ["| image | finding | probability | bbox |", "|---|---|---|---|"]
    rows += [
        f"| {image} | {_clean(f.label)} | {f.probability:.2f} | {_bbox(f.bbox)} |"
        for image, f in _ordered(findings)
    ]
    return "\n".join(rows)


def make_bedrock_client(cfg: ReportConfig) -> BedrockRuntimeClient:
    """A ``bedrock-runtime`` client with botocore retries off.

    ``endpoint_url`` points it at a local fake of ``POST /model/{id}/converse``.

    Raises:
        ConfigError: the endpoint URL or the AWS setup is unusable.
    """
    config = client_config(READ_TIMEOUT_S)
    return create_client(
        lambda: new_session(cfg.region).client(
            "bedrock-runtime", endpoint_url=cfg.endpoint_url or None, config=config
        ),
        "report",
    )


class BedrockReporter:
    """Drafts with one Converse call per study (temperature 0)."""

    def __init__(
        self,
        cfg: ReportConfig,
        policy: RetryPolicy,
        client: BedrockRuntimeClient | None = None,
        template: PromptTemplate | None = None,
    ) -> None:
        self._cfg = cfg
        self._policy = policy
        self._template = template if template is not None else PromptTemplate.load()
        self._client = client if client is not None else make_bedrock_client(cfg)
        self.prompt_hash = self._template.hash

    def draft(self, request: ReportRequest) -> ReportRecord:
        """Draft a report for ``request`` (errors as ``Reporter.draft``)."""
        args = self._request(self._template.render(request), self._cfg.max_tokens)
        response = self._converse(DRAFT_STEP, args)
        if response.get("stopReason") == "guardrail_intervened":
            # The text is then the guardrail's canned message, not a report.
            raise PermanentError(
                f"{DRAFT_STEP}: the Bedrock guardrail blocked the draft report", step=DRAFT_STEP
            )
        usage = response.get("usage", {})
        return ReportRecord(
            text=_answer_text(response),
            model_id=self._cfg.model_id,
            input_tokens=usage.get("inputTokens", 0),
            output_tokens=usage.get("outputTokens", 0),
            stop_reason=response.get("stopReason", ""),
            prompt_hash=self.prompt_hash,
        )

    def ping(self) -> str:
        """One Converse call of one output token on a fixed prompt.

        This exercises exactly what ``draft`` needs (``bedrock:InvokeModel`` on
        this model, model access granted in this region, the guardrail, and
        ``endpoint_url``) for a fraction of a cent. ``GetFoundationModel``
        would need another permission, would not see access grants or
        guardrails, and knows no inference-profile ids.

        Raises:
            As ``draft``.
        """
        response = self._converse(PING_STEP, self._request(PING_PROMPT, 1))
        return f"Bedrock model {self._cfg.model_id} answered ({response.get('stopReason', '')})"

    def _request(self, prompt: str, max_tokens: int) -> ConverseRequestTypeDef:
        args: ConverseRequestTypeDef = {
            "modelId": self._cfg.model_id,
            "system": [{"text": self._template.system}],
            "messages": [{"role": "user", "content": [{"text": prompt}]}],
            # Temperature 0: the same findings give (nearly) the same draft.
            "inferenceConfig": {"maxTokens": max_tokens, "temperature": 0},
        }
        if self._cfg.guardrail_id and self._cfg.guardrail_version:
            args["guardrailConfig"] = {
                "guardrailIdentifier": self._cfg.guardrail_id,
                "guardrailVersion": self._cfg.guardrail_version,
            }
        return args

    def _converse(self, step: str, args: ConverseRequestTypeDef) -> ConverseResponseTypeDef:
        return aws_call(
            self._policy,
            step,
            lambda: self._client.converse(**args),
            BEDROCK_ERRORS,
            f"model {self._cfg.model_id}",
        )


def _answer_text(response: ConverseResponseTypeDef) -> str:
    """The text blocks of the answer, joined.

    Raises:
        PermanentError: no text at all ("model contract broken").
    """
    message = response.get("output", {}).get("message", {})
    text = "".join(block.get("text", "") for block in message.get("content", []))
    if not text.strip():
        raise PermanentError(
            f"{DRAFT_STEP}: model contract broken: Bedrock answered no text "
            f"(stopReason {response.get('stopReason', '')!r})",
            step=DRAFT_STEP,
        )
    return text.strip()


class TemplateReporter:
    """A deterministic plain-English draft from the findings: no LLM, no network."""

    def __init__(self, prompt_hash: str = TEMPLATE_VERSION, threshold: float = THRESHOLD) -> None:
        self.prompt_hash = prompt_hash
        self._threshold = threshold

    def draft(self, request: ReportRequest) -> ReportRecord:
        """The same findings always give the same text."""
        return ReportRecord(
            text=template_report(request, self._threshold),
            model_id=f"cxrd-{TEMPLATE_VERSION}",
            stop_reason="end_turn",
            prompt_hash=self.prompt_hash,
        )

    def ping(self) -> str:
        """Nothing to reach."""
        return "template reporter (no external service)"


def template_report(request: ReportRequest, threshold: float = THRESHOLD) -> str:
    """The template backend's text; the first line is the summary."""
    ordered = _ordered(request.findings)
    above = [(i, f) for i, f in ordered if f.probability >= threshold]
    below = [(i, f) for i, f in ordered if f.probability < threshold]
    view = _clean(request.view) or "unknown"
    images = f"{request.image_count} image{'' if request.image_count == 1 else 's'}"
    cut = f"{threshold:.2f}"
    lines = [f"Draft (automated, template): {view} view, {images}. {_summary(above, cut)}", ""]
    if above:
        lines.append(f"Findings at or above {cut}:")
        lines += [f"- {_clean(f.label)}: {f.probability:.2f}, {_where(i, f)}" for i, f in above]
    if below:
        listed = ", ".join(f"{_clean(f.label)} ({f.probability:.2f})" for _, f in below)
        lines.append(f"Below {cut}: {listed}.")
    if not ordered:
        lines.append("The models reported no findings.")
    lines += [
        "",
        "Generated from model outputs by a fixed template; not reviewed by a radiologist.",
    ]
    return "\n".join(lines)


def _summary(above: list[tuple[int, FindingRecord]], cut: str) -> str:
    if not above:
        return f"No finding at or above {cut}."
    best: dict[str, float] = {}  # highest probability per label over all images
    for _, f in above:
        best[_clean(f.label)] = max(best.get(_clean(f.label), 0.0), f.probability)
    listed = ", ".join(f"{label} ({p:.2f})" for label, p in best.items())
    return f"Findings at or above {cut}: {listed}."


def _where(image: int, finding: FindingRecord) -> str:
    if finding.bbox is None:
        return f"image {image}, not located"
    x0, y0, x1, y1 = finding.bbox
    return f"image {image}, region x {x0}-{x1}, y {y0}-{y1}"


class NoReporter:
    """The ``none`` backend: no report is drafted."""

    prompt_hash = ""

    def draft(self, request: ReportRequest) -> None:  # noqa: ARG002 - Reporter signature
        """Draft nothing."""
        return

    def ping(self) -> str:
        """Nothing to reach."""
        return "no reporter configured (report.backend = none)"


def build_reporter(cfg: ReportConfig, policy: RetryPolicy) -> Reporter:
    """The reporter ``cfg.backend`` names.

    Raises:
        ConfigError: the Bedrock client or the prompt file cannot be set up.
    """
    if cfg.backend == "bedrock":
        return BedrockReporter(cfg, policy)
    if cfg.backend == "template":
        return TemplateReporter()
    return NoReporter()
