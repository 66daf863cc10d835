"""The ``cxrd`` command: parse -> config -> bootstrap -> exit code (STYLE.md §1).

Exit codes: 0 success; 1 the command's work failed (a study did not process,
an unknown study); 2 fatal configuration problem (config file, credentials,
schema), printed as one line on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar

import structlog
import typer

from cxr_daemon import __version__, bootstrap, config, logconf, modelserver
from cxr_daemon.backfill import build_housekeeping
from cxr_daemon.domain import StudyState
from cxr_daemon.errors import ConfigError, CxrdError
from cxr_daemon.pipeline import RunSummary
from cxr_daemon.reprocess import reprocess_study
from cxr_daemon.status import study_status, summary
from cxr_daemon.worker import Daemon

T = TypeVar("T")
log = structlog.get_logger("cxr_daemon.cli")

app = typer.Typer(
    help="cxrd: chest X-ray AI orchestrator for Orthanc.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Config file (default: $CXRD_CONFIG, /etc/cxrd/config.toml)."
    ),
]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"cxrd: {message}", err=True)
    raise typer.Exit(code)


def _guarded(fn: Callable[[], T]) -> T:
    """Run a command body, turning cxrd errors into one line and an exit code."""
    try:
        return fn()
    except ConfigError as exc:
        _fail(str(exc), 2)
    except CxrdError as exc:
        _fail(str(exc), 1)


def _load(path: Path | None) -> config.Config:
    cfg = _guarded(lambda: config.load(path))
    logconf.configure(cfg.log.format, cfg.log.level)
    return cfg


def _install_signals(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: stop claiming and drain. Second: exit at once."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            os.write(2, f"cxrd: second signal {signum}, exiting now\n".encode())
            os._exit(1)
        stop.set()
        # Handlers run in the main thread between bytecodes, so logging is safe here.
        log.warning("shutdown_requested", signal=signum, hint="a second signal exits at once")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@app.command()
def run(
    config_path: ConfigOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Drain feed and queue, then exit.")] = False,
) -> None:
    """Run the daemon in the foreground (what systemd runs)."""
    cfg = _load(config_path)
    stop = threading.Event()
    _install_signals(stop)
    services = _guarded(lambda: bootstrap.build(cfg, stop))

    notifier = services.notifier

    def body() -> None:
        services.store.require_current_schema()
        reclaimed = services.store.reclaim_running(cfg.pipeline.max_attempts)
        checkpoint = services.poller.prime()  # Orthanc reachable, credentials accepted
        notifier.ready(f"checkpoint {checkpoint}")
        log.info(
            "daemon_started",
            version=__version__,
            checkpoint=checkpoint,
            reclaimed=reclaimed,
            once=once,
        )
        daemon = Daemon(
            services.poller,
            services.worker,
            stop,
            cfg.orthanc.poll_interval_s,
            heartbeat=notifier.watchdog,
            housekeeping=build_housekeeping(cfg, services.orthanc, services.store),
            workers=cfg.pipeline.workers,
        )
        daemon.run(once=once)

    try:
        _guarded(body)
    finally:
        notifier.stopping()
        log.info("daemon_stopped", signal_received=stop.is_set())
        services.close()


@app.command()
def status(
    config_path: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    study: Annotated[str | None, typer.Option("--study", help="One StudyInstanceUID.")] = None,
) -> None:
    """Checkpoint vs Orthanc (lag), queue counts by state, recent failures."""
    cfg = _load(config_path)
    services = _guarded(lambda: bootstrap.build(cfg))
    try:
        if study:
            data = _guarded(lambda: study_status(services.store, study))
            if data is None:
                _fail(f"cxrd has never seen study {study}", 1)
        else:
            data = _guarded(lambda: summary(services.store, services.orthanc))
    finally:
        services.close()
    if as_json:
        typer.echo(json.dumps(data))
    else:
        _print_status(data)


def _print_status(data: dict[str, Any]) -> None:
    if "state" in data:
        typer.echo(f"study {data['study_uid']}: {data['state']} (attempts {data['attempts']})")
        if data["reason"]:
            typer.echo(f"  reason: {data['reason']}")
        for r in data["runs"]:
            typer.echo(f"  run {r['run_id']} {r['trigger']} {r['outcome']} {r['started_at']}")
        return
    lag = data["lag"] if data["lag"] is not None else f"unknown ({data.get('orthanc_error')})"
    typer.echo(f"checkpoint {data['checkpoint']}  orthanc last {data['orthanc_last']}  lag {lag}")
    typer.echo("  ".join(f"{k} {v}" for k, v in data["counts"].items()))
    if data.get("oldest_waiting_s") is not None:
        typer.echo(f"oldest waiting: {data['oldest_waiting_s']:.0f} s")
    for f in data["failures"]:
        typer.echo(f"FAILED {f['study_uid']} after {f['attempts']} attempts: {f['reason']}")


@app.command()
def reprocess(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID to process again.")],
    config_path: ConfigOpt = None,
) -> None:
    """Run the pipeline for one study now, as a new run, whatever its state."""
    cfg = _load(config_path)
    services = _guarded(lambda: bootstrap.build(cfg))
    try:
        done = _guarded(lambda: reprocess_study(services, study_uid))
    finally:
        services.close()
    if done.summary is not None and done.state is StudyState.DONE:
        _print_summary(done.summary)
        return
    _fail(f"study {study_uid} {done.state.value}: {done.reason}", 1)


def _print_summary(summary: RunSummary) -> None:
    typer.echo(f"study {summary.study_uid}: done (run {summary.run_id})")
    typer.echo(f"  instances: {summary.instances}")
    notable = ", ".join(f"{f.label} {f.probability:.2f}" for f in summary.findings) or "none"
    typer.echo(f"  findings >= 0.5: {notable}")
    typer.echo(f"  s3: {summary.s3_prefix}")
    typer.echo(f"  report: {summary.report_first_line or '(no report)'}")


@app.command("model-server")
def model_server(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    latency_ms: Annotated[int, typer.Option(help="Added latency per model call.")] = 0,
) -> None:
    """The reference model server: NOT a medical model, a stand-in for demos and tests."""
    logconf.configure("auto", "info")
    modelserver.serve_forever(host, port, latency_ms)


@app.command()
def check(config_path: ConfigOpt = None) -> None:
    """Reach every dependency and report each OK/FAIL; non-zero if any fails."""
    from cxr_daemon.checks import run_checks  # noqa: PLC0415 - command-specific module

    cfg = _load(config_path)
    raise typer.Exit(run_checks(cfg))


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the sandbox's files after exit.")] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Work in this new or empty directory (implies --keep)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="Give up after this many seconds of processing.")
    ] = 180.0,
) -> None:
    """Local sandbox: real Orthanc + local S3 + reference model server, sample CXRs."""
    from cxr_daemon.demo import run_demo  # noqa: PLC0415 - pulls in the sandbox

    raise typer.Exit(run_demo(keep=keep, workdir=workdir, timeout_s=timeout))


@app.command()
def backfill(
    since: Annotated[str, typer.Option(help="First StudyDate, YYYY-MM-DD.")],
    until: Annotated[str | None, typer.Option(help="Last StudyDate, YYYY-MM-DD.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print what would be queued.")] = False,
    config_path: ConfigOpt = None,
) -> None:
    """Queue every CR/DX study in a StudyDate range that cxrd has never processed."""
    from cxr_daemon.backfill import run_backfill  # noqa: PLC0415

    cfg = _load(config_path)
    raise typer.Exit(run_backfill(cfg, since, until, dry_run=dry_run))


@db_app.command("migrate")
def db_migrate(config_path: ConfigOpt = None) -> None:
    """Create or upgrade the database schema (idempotent)."""
    cfg = _load(config_path)
    store = _guarded(lambda: bootstrap.build_store(cfg))
    try:
        before, after = _guarded(store.migrate)
    finally:
        store.close()
    if before == after:
        typer.echo(f"schema is current (version {after})")
    else:
        typer.echo(f"schema migrated from version {before} to {after}")


@app.command()
def version() -> None:
    """Print cxrd's version."""
    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry point alternative
    """Entry point for ``python -m cxr_daemon``."""
    sys.exit(app())
