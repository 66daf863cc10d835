"""``cxrd check``: reach every dependency, one line each, non-zero if any fails.

Each adapter's ``ping`` does the work (STYLE.md §2): Orthanc ``/system``
(reachable, credentials accepted), the database (reachable, schema current),
S3 (a probe object put and deleted under ``{prefix}/.cxrd-check/``), the two
model endpoints (``/ping``, or DescribeEndpoint InService), Bedrock (a
one-token Converse). The checks run in parallel, each bounded by its
adapter's timeouts with a single attempt, so a dead dependency costs one
timeout and the whole command the slowest check, not the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import typer

from cxr_daemon import bootstrap
from cxr_daemon.config import Config
from cxr_daemon.errors import CxrdError


@dataclass(frozen=True)
class CheckResult:
    """One dependency's outcome: ``detail`` says what answered, or why it failed."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """``OK   name  detail`` or ``FAIL name  reason``."""
        return f"{'OK' if self.ok else 'FAIL':<4} {self.name:<15} {self.detail}"


def _run_one(name: str, ping: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, ok=True, detail=ping())
    except CxrdError as exc:
        return CheckResult(name, ok=False, detail=_one_line(str(exc)))
    # A diagnostic must print every line: an error an adapter failed to map
    # (a bug) fails its own check, named by its type, and the others still run.
    except Exception as exc:  # noqa: BLE001
        return CheckResult(name, ok=False, detail=_one_line(f"{type(exc).__name__}: {exc}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def check_all(cfg: Config) -> Iterator[CheckResult]:
    """Ping every dependency in parallel; yield the results in a fixed order."""
    pings = bootstrap.dependency_pings(cfg)
    if cfg.report.backend != "bedrock":
        backend = cfg.report.backend
        pings["bedrock"] = lambda: f"(not used: backend {backend})"
    with ThreadPoolExecutor(max_workers=len(pings), thread_name_prefix="cxrd-check") as pool:
        futures = [pool.submit(_run_one, name, ping) for name, ping in pings.items()]
        for future in futures:
            yield future.result()


def run_checks(cfg: Config) -> int:
    """Print one line per dependency; return 0 when all are OK, else 1."""
    failed = 0
    for result in check_all(cfg):
        typer.echo(result.line())
        failed += not result.ok
    if failed:
        typer.echo(f"cxrd: {failed} dependency check(s) failed", err=True)
    return 1 if failed else 0
