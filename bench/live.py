"""Measurements on a running daemon: (d) memory over many studies, (e) event -> done latency."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import requests
from corpus import KINDS, mix, write_studies
from cxrd_runs import LiveDaemon, migrate, parse_record, proc_status, wait_until, write_config
from experiments import BenchError, Context
from services import store

from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess

MEMORY_CHECKPOINTS = (50, 100, 200)
RSS_LIMIT_MB = 300.0
WAIT_DONE_S = 180.0


# -- (d) memory ---------------------------------------------------------------


def memory(ctx: Context, small: int) -> dict[str, Any]:
    """``cxrd run --once`` over ``small`` one-image studies plus one 4000x4000 16-bit image.

    The big image comes at three quarters of the run (after the 100 mark), so the
    RSS at 50 and 100 shows the plateau of ordinary studies and the peak shows
    what one large image adds. RSS is read from /proc when the daemon logs a
    study's end.
    """
    ctx.sandbox.models.latency_ms = 0
    kinds = ["small"] * small
    big_at = max(1, small * 3 // 4)
    kinds.insert(big_at, "single_4k")
    studies = write_studies(ctx.workdir / "dicom-memory", kinds, first_number=5000)
    uids = [s.study_uid for s in studies]
    ctx.say(f"(d) sending {len(studies)} studies to the second Orthanc")
    store(ctx.sandbox.orthanc_memory, [f for s in studies for f in s.files], uids)
    big_uid = studies[big_at].study_uid
    marks = {n for n in (*MEMORY_CHECKPOINTS, len(studies)) if n <= len(studies)}
    snapshots: dict[str, dict[str, float]] = {}
    state: dict[str, Any] = {"count": 0, "pid": None}

    def on_record(record: dict[str, Any]) -> None:
        finished = parse_record(record)
        if finished is None or state["pid"] is None:
            return
        state["count"] += 1
        now = proc_status(state["pid"])
        if state["count"] in marks:
            snapshots[str(state["count"])] = now
        if finished.study_uid == big_uid:
            snapshots["after_4000x4000"] = now

    daemon = _start(ctx, ctx.sandbox.orthanc_memory, on_record, once=True, workers=1)
    state["pid"] = daemon.proc.pid  # long before the first study ends
    outcome = daemon.finish(terminate=False)
    if outcome.code != 0 or outcome.done() != len(studies):
        raise BenchError(f"memory run: {outcome.done()} of {len(studies)} done; {outcome.log}")
    for study in studies:
        for path in study.files:
            path.unlink()
    rss = {k: round(v.get("VmRSS", float("nan")), 1) for k, v in snapshots.items()}
    hwm = {k: round(v.get("VmHWM", float("nan")), 1) for k, v in snapshots.items()}
    ctx.say(
        f"(d) {len(studies)} studies in {outcome.wall_s:.1f} s, peak {outcome.peak_rss_mb:.0f} MB"
    )
    return {
        "studies": len(studies),
        "small_image": "1024x1024 12-bit, one view",
        "workers": 1,
        "model_latency_ms": 0,
        "big_image_position": big_at + 1,
        "rss_mb_after": rss,
        "peak_rss_mb_after": hwm,
        "peak_rss_mb": round(outcome.peak_rss_mb, 1),
        "under_300_mb": outcome.peak_rss_mb < RSS_LIMIT_MB,
        "wall_s": round(outcome.wall_s, 1),
    }


def _start(
    ctx: Context,
    orthanc: OrthancProcess,
    on_record: Callable[[dict[str, Any]], None],
    *,
    once: bool,
    workers: int,
    start_from: str = "beginning",
    poll_interval_s: float = 1.0,
) -> LiveDaemon:
    """A daemon on a fresh DB and bucket (dropped at the end of the session)."""
    sandbox = ctx.sandbox
    config = write_config(
        ctx.next_path("live", ".toml"), orthanc, s3_url=sandbox.s3_url,
        bucket=sandbox.buckets.fresh(), models_url=sandbox.models.url,
        db_url=sandbox.databases.fresh(), workers=workers, start_from=start_from,
        poll_interval_s=poll_interval_s,
    )  # fmt: skip
    migrate(config)
    return LiveDaemon(config, config.with_suffix(".log"), on_record, once=once)


# -- (e) event -> done ---------------------------------------------------------


class StableWatcher:
    """Polls Orthanc's /changes every 50 ms; notes when each study's StableStudy appears."""

    def __init__(self, orthanc: OrthancProcess) -> None:
        self.orthanc = orthanc
        self.seen: dict[str, float] = {}  # Orthanc study ID -> epoch seconds
        self.halt = threading.Event()
        self.session = requests.Session()
        self.session.auth = orthanc.auth
        self.since = self._get(f"{orthanc.url}/changes?last")["Last"]
        self.thread = threading.Thread(target=self._loop, name="stable-watcher", daemon=True)
        self.thread.start()

    def _get(self, url: str) -> Any:
        answer = self.session.get(url, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def _loop(self) -> None:
        while not self.halt.wait(0.05):
            page = self._get(f"{self.orthanc.url}/changes?since={self.since}&limit=100")
            now = time.time()
            for change in page["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    self.seen.setdefault(change["ID"], now)
            self.since = page["Last"]

    def stop(self) -> None:
        """Stop polling."""
        self.halt.set()
        self.thread.join(5)
        self.session.close()


def latency(ctx: Context, count: int, latency_ms: float, poll_interval_s: float) -> dict[str, Any]:
    """(e) C-STORE ``count`` studies one at a time into a live daemon; time each to done.

    The event is the StableStudy change (timestamped here by polling /changes);
    done is the daemon's ``study_finished`` line. Between studies a random pause
    of up to one poll interval, so arrivals do not lock to the daemon's polling.
    """
    ctx.sandbox.models.latency_ms = latency_ms
    kinds = mix(count)
    studies = write_studies(ctx.workdir / "dicom-latency", kinds, first_number=9000)
    finished: dict[str, Any] = {}

    def on_record(record: dict[str, Any]) -> None:
        study = parse_record(record)
        if study is not None:
            finished[study.study_uid] = study

    orthanc = ctx.sandbox.orthanc
    daemon = _start(ctx, orthanc, on_record, once=False, workers=1, start_from="now",
                    poll_interval_s=poll_interval_s)  # fmt: skip
    rows = []
    watcher: StableWatcher | None = None
    try:
        watcher = StableWatcher(orthanc)
        _wait_started(daemon)
        for study in studies:
            time.sleep(random.uniform(0, poll_interval_s))
            send_files(list(study.files), host="127.0.0.1", port=orthanc.dicom_port)
            if not wait_until(lambda s=study: s.study_uid in finished, WAIT_DONE_S):
                raise BenchError(f"(e) a study was not done in {WAIT_DONE_S} s; {daemon.log_path}")
            rows.append((study, finished[study.study_uid]))
    finally:
        if watcher is not None:
            watcher.stop()
        outcome = daemon.finish(terminate=True)
    ctx.say(f"(e) {count} studies, daemon exit {outcome.code}")
    return _latency_section(orthanc, watcher, rows, latency_ms, poll_interval_s)


def _wait_started(daemon: LiveDaemon, timeout_s: float = 60) -> None:
    """Until the daemon has read its checkpoint (it logged daemon_started)."""
    if not wait_until(daemon.started.is_set, timeout_s) or not daemon.alive():
        raise BenchError(f"(e) the daemon did not start; see {daemon.log_path}")


def _latency_section(
    orthanc: OrthancProcess, watcher: StableWatcher, rows: list[tuple[Any, Any]],
    latency_ms: float, poll_interval_s: float,
) -> dict[str, Any]:  # fmt: skip
    ids = _orthanc_ids(orthanc, [study.study_uid for study, _done in rows])
    to_done, waits, work, beyond, cpu_work = [], [], [], [], []
    for study, done in rows:
        event = watcher.seen.get(ids[study.study_uid])
        if event is None:
            raise BenchError("(e) a StableStudy change was never seen")
        # Per image the two models are asked at once: one latency, not two.
        model_s = len(KINDS[study.kind]) * latency_ms / 1000
        to_done.append(done.end - event)
        waits.append(done.start - event)
        work.append(done.duration_s)
        beyond.append(done.end - event - model_s)
        cpu_work.append(done.duration_s - model_s)
    return {
        "event_to_done_s": _p50_p95(to_done),
        "event_to_claim_s": _p50_p95(waits),
        "processing_s": _p50_p95(work),
        "beyond_model_time_s": _p50_p95(beyond),
        "processing_beyond_model_s": _p50_p95(cpu_work),
        "target_beyond_model_s": poll_interval_s + 1,
        "studies": len(rows),
        "kinds": [study.kind for study, _done in rows],
        "model_latency_ms": latency_ms,
        "model_calls_per_image": 2,
        "model_calls_concurrent": True,
        "poll_interval_s": poll_interval_s,
        "samples_s": [round(x, 3) for x in to_done],
    }


def _p50_p95(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {"p50": round(float(np.percentile(array, 50)), 3),
            "p95": round(float(np.percentile(array, 95)), 3)}  # fmt: skip


def _orthanc_ids(orthanc: OrthancProcess, uids: list[str]) -> dict[str, str]:
    """StudyInstanceUID -> Orthanc study ID."""
    found = {}
    with requests.Session() as session:
        session.auth = orthanc.auth
        for uid in uids:
            answer = session.post(f"{orthanc.url}/tools/lookup", data=uid, timeout=10)
            answer.raise_for_status()
            found[uid] = next(hit["ID"] for hit in answer.json() if hit["Type"] == "Study")
    return found
