"""Measurements (a) floor vs ``cxrd run --once``, and (c) throughput by worker count.

Every daemon run gets a fresh database and a fresh bucket, reads the feed from
the beginning and must finish every study ``done`` with every object in S3;
otherwise the benchmark stops with the run's log rather than report a number
for work that was not done. Repetitions are interleaved (floor, once, floor,
once, ...; w1, w2, w4, w8, w1, ...) so that a burst of load from other users
of the machine spreads over the variants instead of landing on one.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus import Study
from cxrd_runs import MAX_SIDE, PREFIX, Outcome, measure, migrate, run_once, write_config
from services import REGION, Sandbox

# Objects a done run writes: jpg, dcm and mask per image; result, report and log per study.
PER_IMAGE, PER_STUDY = 3, 3


class BenchError(Exception):
    """A run did not do the work (a failed study, a missing object, a crash)."""


@dataclass
class Context:
    """The sandbox, the corpus in Orthanc and the options of this session."""

    sandbox: Sandbox
    workdir: Path
    corpus: list[Study]
    instances: list[str]
    reps: int
    started: float = field(default_factory=time.monotonic)
    runs: int = 0

    def say(self, text: str) -> None:
        """A progress line on stderr (stdout is the table)."""
        load = " ".join(f"{x:.2f}" for x in _loadavg())
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s load {load}] {text}", file=sys.stderr, flush=True)

    def next_path(self, stem: str, suffix: str) -> Path:
        """A new file name in the work directory."""
        self.runs += 1
        return self.workdir / f"{self.runs:03d}-{stem}{suffix}"


def _loadavg() -> tuple[float, float, float]:
    with Path("/proc/loadavg").open(encoding="ascii") as handle:
        one, five, fifteen = (float(x) for x in handle.read().split()[:3])
    return one, five, fifteen


def median(values: list[float]) -> float:
    """Median, rounded for the results file."""
    return round(statistics.median(values), 3)


# -- (a) the floor -----------------------------------------------------------


def floor_run(ctx: Context) -> dict[str, Any]:
    """One run of bench/floor.py on the corpus, into a fresh bucket."""
    sandbox = ctx.sandbox
    bucket = sandbox.buckets.fresh()
    user, password = sandbox.orthanc.auth
    job = {
        "orthanc_url": sandbox.orthanc.url, "orthanc_user": user, "orthanc_password": password,
        "s3_url": sandbox.s3_url, "region": REGION, "bucket": bucket, "prefix": PREFIX,
        "max_side": MAX_SIDE, "instances": ctx.instances,
    }  # fmt: skip
    job_path = ctx.next_path("floor-job", ".json")
    job_path.write_text(json.dumps(job), encoding="utf-8")
    out_path = job_path.with_name(job_path.stem + "-out.json")
    script = str(Path(__file__).with_name("floor.py"))
    try:
        with out_path.open("wb") as out:
            outcome = measure([sys.executable, script, str(job_path)], out_path.with_suffix(".log"),
                              stdout=out)  # fmt: skip
        objects, _size = sandbox.buckets.count(bucket)
    finally:
        sandbox.buckets.drop(bucket)
    if outcome.code != 0 or objects != 2 * len(ctx.instances):
        raise BenchError(f"floor.py exit {outcome.code}, {objects} objects; see {outcome.log}")
    inner = json.loads(out_path.read_text(encoding="utf-8"))
    return {"wall_s": outcome.wall_s, "peak_rss_mb": outcome.peak_rss_mb,
            "cpu_s": outcome.cpu_s, **inner}  # fmt: skip


# -- (b), (c) the daemon ---------------------------------------------------------


def daemon_run(
    ctx: Context, workers: int, latency_ms: float, wrapper: tuple[str, ...] = ()
) -> Outcome:
    """``cxrd run --once`` over the corpus: fresh DB and bucket, checked, cleaned up."""
    sandbox = ctx.sandbox
    sandbox.models.latency_ms = latency_ms
    db_url, bucket = sandbox.databases.fresh(), sandbox.buckets.fresh()
    stem = f"once-w{workers}-l{latency_ms:g}"
    try:
        config = write_config(
            ctx.next_path(stem, ".toml"), sandbox.orthanc, s3_url=sandbox.s3_url,
            bucket=bucket, models_url=sandbox.models.url, db_url=db_url, workers=workers,
        )  # fmt: skip
        migrate(config)
        before = sandbox.cpu_seconds()
        outcome = run_once(config, config.with_suffix(".log"), wrapper)
        after = sandbox.cpu_seconds()
        outcome.services_cpu_s = {name: after[name] - before[name] for name in after}
        objects, _size = sandbox.buckets.count(bucket)
    finally:
        sandbox.buckets.drop(bucket)
        sandbox.databases.drop(db_url)
    expected = PER_IMAGE * len(ctx.instances) + PER_STUDY * len(ctx.corpus)
    if outcome.code != 0 or outcome.done() != len(ctx.corpus) or objects != expected:
        raise BenchError(
            f"cxrd run --once (workers={workers}) exit {outcome.code}: {outcome.done()} of "
            f"{len(ctx.corpus)} studies done, {objects} of {expected} objects; see {outcome.log}"
        )
    return outcome


def per_min(outcome: Outcome) -> float:
    """Studies per minute over the processing window (first taken to last finished)."""
    return 60 * outcome.done() / outcome.span_s()


def floor_vs_once(ctx: Context) -> tuple[dict[str, Any], list[Outcome]]:
    """(a) and (b), interleaved, ``ctx.reps`` times each; also the w1 runs for (c)."""
    floors, onces = [], []
    for rep in range(1, ctx.reps + 1):
        floors.append(floor_run(ctx))
        ctx.say(f"(a) floor {rep}/{ctx.reps}: {floors[-1]['wall_s']:.2f} s")
        onces.append(daemon_run(ctx, workers=1, latency_ms=0))
        ctx.say(f"(b) cxrd run --once w1 {rep}/{ctx.reps}: {onces[-1].wall_s:.2f} s")
    floor_s = median([f["wall_s"] for f in floors])
    once_s = median([o.wall_s for o in onces])
    floor_work = median([f["work_s"] for f in floors])
    once_span = median([o.span_s() for o in onces])
    section = {
        "floor_s": floor_s,
        "once_w1_s": once_s,
        "ratio_once_vs_floor": round(once_s / floor_s, 3),
        "ratio_in_process": round(once_span / floor_work, 3),
        "floor_runs_s": [round(f["wall_s"], 3) for f in floors],
        "once_w1_runs_s": [round(o.wall_s, 3) for o in onces],
        "floor_work_s": floor_work,
        "once_w1_processing_s": once_span,
        "floor_steps_s": _median_steps([f["steps_s"] for f in floors]),
        "once_w1_steps_s": _median_steps([o.steps_s for o in onces]),
        "floor_cpu_s": median([f["cpu_s"] for f in floors]),
        "once_w1_cpu_s": median([o.cpu_s for o in onces]),
        "floor_peak_rss_mb": median([f["peak_rss_mb"] for f in floors]),
        "peak_rss_mb": median([o.peak_rss_mb for o in onces]),
        "peak_rss_mb_max": round(max(o.peak_rss_mb for o in onces), 1),
        "peak_rss_mb_runs": [round(o.peak_rss_mb, 1) for o in onces],
    }
    return section, onces


def _median_run(outcomes: list[Outcome]) -> Outcome:
    """The run with the median studies/min."""
    ranked = sorted(outcomes, key=per_min)
    return ranked[(len(ranked) - 1) // 2]


def _median_steps(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per step, the median over runs of its total seconds."""
    names = sorted({name for run in runs for name in run})
    return {name: median([run.get(name, 0.0) for run in runs]) for name in names}


def throughput(
    ctx: Context, w1_instant: list[Outcome], workers: tuple[int, ...], latency_ms: float
) -> dict[str, Any]:
    """(c) studies/min by worker count, at ``latency_ms`` per model call and with instant models.

    The w1 instant runs are (b)'s when given (``w1_instant``), not repeated.
    """
    results: dict[tuple[float, int], list[Outcome]] = {}
    if w1_instant:
        results[0.0, 1] = list(w1_instant)
    for rep in range(1, ctx.reps + 1):
        for latency in (latency_ms, 0.0):
            for count in workers:
                if latency == 0 and count == 1 and w1_instant:
                    continue
                outcome = daemon_run(ctx, workers=count, latency_ms=latency)
                results.setdefault((latency, count), []).append(outcome)
                ctx.say(
                    f"(c) w{count} latency {latency:g} ms {rep}/{ctx.reps}: {outcome.wall_s:.1f} s,"
                    f" {per_min(outcome):.1f} studies/min, in flight {outcome.concurrency()}"
                )
    return _throughput_section(results, workers, latency_ms)


def _throughput_section(
    results: dict[tuple[float, int], list[Outcome]], workers: tuple[int, ...], latency_ms: float
) -> dict[str, Any]:
    def table(latency: float, rate: Any) -> dict[str, float]:
        return {str(w): median([rate(o) for o in results[latency, w]]) for w in workers}

    slow = table(latency_ms, per_min)
    instant = table(0.0, per_min)
    first, last = str(workers[0]), str(workers[-1])
    return {
        "throughput_per_min": slow,
        "cpu_bound_per_min": max(instant.values()),
        "cpu_bound_by_workers_per_min": instant,
        "scaling_last_vs_first": round(slow[last] / slow[first], 3),
        "throughput_wall_per_min": table(latency_ms, lambda o: 60 * o.done() / o.wall_s),
        "in_flight_max": {
            f"{latency:g}ms": {
                str(w): max(o.concurrency() for o in results[latency, w]) for w in workers
            }
            for latency in (latency_ms, 0.0)
        },
        "daemon_cores_busy": {
            f"{latency:g}ms": table(latency, lambda o: o.cores()) for latency in (latency_ms, 0.0)
        },
        # Where the machine's cores went (median run): the daemon and each sandbox service.
        "cores_by_process": {
            f"{latency:g}ms": {
                str(w): _median_run(results[latency, w]).cores_by_process() for w in workers
            }
            for latency in (latency_ms, 0.0)
        },
        "peak_rss_mb_by_workers": {
            str(w): round(
                max(o.peak_rss_mb for lat in (latency_ms, 0.0) for o in results[lat, w]), 1
            )
            for w in workers
        },
        "steps_s_by_workers": {
            str(w): _median_steps([o.steps_s for o in results[latency_ms, w]]) for w in workers
        },
    }
