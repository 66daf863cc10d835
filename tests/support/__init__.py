"""Test-only helpers that start real servers (the Orthanc one lives in cxr_daemon.sandbox)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """Skip the test because a real service cannot run here; under `CI=true`, fail instead.

    Raises:
        pytest.skip.Exception: locally.
        pytest.fail.Exception: in CI, where every service must be available.
    """
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: integration services are required)")
    pytest.skip(reason)
