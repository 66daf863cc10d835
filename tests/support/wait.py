"""Wait for an observable condition, bounded: the only way tests synchronise."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout_s: float = 60, what: str = "") -> T:
    """Call ``check`` until it returns something truthy; return it, or raise TimeoutError."""

    @tenacity.retry(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
        retry=tenacity.retry_if_result(lambda value: not value),
        retry_error_callback=lambda state: None,
    )
    def attempt() -> T | None:
        return check()

    value = attempt()
    if not value:
        raise TimeoutError(f"not true after {timeout_s} s: {what or check}")
    return value
