"""What every AWS adapter test needs: no real AWS, and retries that do not wait."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxr_daemon.adapters.retry import RetryPolicy

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

REGION = "us-east-1"


def fast_policy() -> RetryPolicy:
    """Three attempts, as in production, with waits of milliseconds."""
    return RetryPolicy(attempts=3, initial_s=0.01, max_wait_s=0.02)


def isolate_from_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, no profile, no instance metadata: nothing reaches AWS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
