"""Configuration: TOML -> frozen dataclasses. The only reader of ``os.environ``.

Sections and keys are DESIGN.md "Configuration". Any unknown key, wrong type,
bad value or missing required value raises ``ConfigError`` with one line that
names the file, ``section.key`` and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_daemon.errors import ConfigError

DEFAULT_PATH = Path("/etc/cxrd/config.toml")
REQUIRED = "required"


def _choice(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _positive() -> dict[str, Any]:
    return {"min": 1}


@dataclass(frozen=True)
class OrthancConfig:
    """``[orthanc]``: where the PACS is and how the feed is read."""

    url: str = "http://127.0.0.1:8042"
    username: str = ""
    password: str = field(default="", repr=False)
    password_env: str = ""
    timeout_s: float = field(default=30.0, metadata=_positive())
    poll_interval_s: float = field(default=2.0, metadata={"min": 0})
    page_size: int = field(default=100, metadata=_positive())
    start_from: str = field(default="now", metadata=_choice("now", "beginning"))
    # Orthanc's own StableAge (its REST API does not expose it, so it is told here).
    stable_age_s: float = field(default=60.0, metadata={"min": 0})
    # A study still waiting this long past StableAge is looked up (its StableStudy was lost).
    stable_margin_s: float = field(default=30.0, metadata={"min": 0})


@dataclass(frozen=True)
class FilterConfig:
    """``[filter]``: which studies are chest X-rays."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)


@dataclass(frozen=True)
class S3Config:
    """``[s3]``: the archive bucket."""

    bucket: str = field(default="", metadata={"required": True})
    prefix: str = "cxrd"
    region: str = "us-east-1"
    endpoint_url: str = ""
    sse: str = field(default="", metadata=_choice("", "AES256", "aws:kms"))
    kms_key_id: str = ""


@dataclass(frozen=True)
class InferenceConfig:
    """``[inference]``: the two model endpoints."""

    backend: str = field(default="sagemaker", metadata=_choice("sagemaker", "http"))
    segmentation_endpoint: str = "cxr-seg"
    classification_endpoint: str = "cxr-cls"
    region: str = ""
    max_side: int = field(default=1024, metadata={"min": 64})
    timeout_s: float = field(default=70.0, metadata=_positive())


@dataclass(frozen=True)
class ReportConfig:
    """``[report]``: how the draft report is written.

    The default is ``template``: without an explicit choice no study data
    leaves the site for an LLM.
    """

    backend: str = field(default="template", metadata=_choice("bedrock", "template", "none"))
    model_id: str = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    region: str = "us-east-1"
    endpoint_url: str = ""
    max_tokens: int = field(default=1024, metadata=_positive())
    guardrail_id: str = ""
    guardrail_version: str = ""


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: MySQL/MariaDB, or SQLite as the embedded default."""

    url: str = "sqlite:///var/lib/cxrd/cxrd.db"
    password: str = field(default="", repr=False)
    password_env: str = ""


@dataclass(frozen=True)
class PipelineConfig:
    """``[pipeline]``: concurrency and retry policy."""

    workers: int = field(default=1, metadata=_positive())
    max_attempts: int = field(default=5, metadata=_positive())
    retry_backoff_s: tuple[float, ...] = (5, 30, 120, 600, 1800)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: output format and level."""

    # "auto": console renderer on a terminal, JSON lines otherwise (journald).
    format: str = field(default="auto", metadata=_choice("auto", "json", "console"))
    level: str = field(
        default="info", metadata=_choice("debug", "info", "warning", "error", "critical")
    )


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (off by default)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=9108, metadata={"min": 1, "max": 65535})


@dataclass(frozen=True)
class SweepConfig:
    """``[sweep]``: a periodic ``/tools/find`` over recent StudyDates (off by default)."""

    enabled: bool = False
    days: int = field(default=7, metadata=_positive())
    interval_s: float = field(default=3600.0, metadata={"min": 60})


@dataclass(frozen=True)
class Config:
    """The whole configuration, one frozen value."""

    path: Path
    orthanc: OrthancConfig = field(default_factory=OrthancConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    s3: S3Config = field(default_factory=S3Config)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Not TOML keys, from the environment: a directory through which tests
    # pause a step (see gate.py), and systemd's notify socket and watchdog.
    test_gate_dir: str = ""
    notify_socket: str = ""
    watchdog_usec: int = 0


SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name not in ("path", "test_gate_dir", "notify_socket", "watchdog_usec")
}


def config_path(explicit: str | Path | None = None) -> Path:
    """The file to read: ``--config``, then ``$CXRD_CONFIG``, then /etc/cxrd/config.toml."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("CXRD_CONFIG") or DEFAULT_PATH)


def load(explicit: str | Path | None = None) -> Config:
    """Read, validate and resolve the configuration.

    Raises:
        ConfigError: missing/unreadable file, TOML syntax, unknown section or
            key, wrong type or value, missing required value, unset secret.
    """
    path = config_path(explicit)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (set --config or $CXRD_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document (see ``load``)."""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path}: [{name}]: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {name}: expected a [{name}] table")
    for name, cls in SECTIONS.items():
        sections[name] = _section(cls, name, raw.get(name, {}), path)
    sections = _resolve_secrets(sections, path)
    if not sections["inference"].region:
        # SageMaker endpoints usually live beside the bucket.
        sections["inference"] = dataclasses.replace(
            sections["inference"], region=sections["s3"].region
        )
    return Config(
        path=path,
        test_gate_dir=os.environ.get("CXRD_TEST_GATE_DIR", ""),
        notify_socket=os.environ.get("NOTIFY_SOCKET", ""),
        watchdog_usec=_int_env("WATCHDOG_USEC"),
        **sections,
    )


def _int_env(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def _section(cls: type[Any], name: str, table: dict[str, Any], path: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            raise ConfigError(f"{path}: {name}.{key}: unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for key, fld in fields.items():
        where = f"{path}: {name}.{key}"
        if key not in table:
            if fld.metadata.get("required"):
                raise ConfigError(f"{where}: required, expected {_describe(hints[key])}")
            continue
        values[key] = _check(table[key], hints[key], fld.metadata, where)
    return cls(**values)


def _check(value: Any, hint: Any, meta: dict[str, Any] | Any, where: str) -> Any:
    expected = _describe(hint)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")
        return tuple(_check(v, item, {}, where) for v in value)
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (hint is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: expected at least {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: expected at most {meta['max']}, got {value!r}")
    if meta.get("required") and value == "":
        raise ConfigError(f"{where}: required, expected a non-empty string")
    return float(value) if hint is float else value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural[typing.get_args(hint)[0]]}"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(hint, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return names.get(hint, str(hint))


def _resolve_secrets(sections: dict[str, Any], path: Path) -> dict[str, Any]:
    """Fill ``password`` from the variable its ``password_env`` twin names."""
    resolved = dict(sections)
    for name in ("orthanc", "database"):
        section = sections[name]
        if not section.password_env:
            continue
        secret = os.environ.get(section.password_env)
        if secret is None:
            raise ConfigError(
                f"{path}: {name}.password_env: expected environment variable "
                f"{section.password_env} to be set"
            )
        resolved[name] = dataclasses.replace(section, password=secret)
    return resolved
