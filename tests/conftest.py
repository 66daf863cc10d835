"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

# <repo>/../shared/data: real CXRs and odd files, present on developer machines and CI.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Callable[[str], Path]:
    """Resolve "cxr/x.dcm" under ../shared/data; skip when absent (fail if required)."""

    def resolve(relative: str) -> Path:
        path = SHARED_DATA / relative
        if path.exists():
            return path
        reason = f"shared test data {relative!r} not found under {SHARED_DATA}"
        if os.environ.get("CXRD_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{reason} (CXRD_REQUIRE_SHARED_DATA=1)")
        pytest.skip(reason)

    return resolve
