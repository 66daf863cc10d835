"""``make bench``: cxrd on the local sandbox against its floor; writes bench/results.json.

The sandbox is real: Orthanc (Debian's), moto's S3 server, the reference model
server (NOT a medical model) with added latency per call, MariaDB at
127.0.0.1:3306 when it answers (production's database) or SQLite. Studies are
phantom chest X-rays of realistic size (two views of 2500x3000 16-bit DX; some
4000x4000; some JPEG 2000 and JPEG Lossless), sent by C-STORE.

Measured, each as the median of ``--reps`` repetitions:
  (a) bench/floor.py: GET, decode + render, JPEG + PNG, PUT; no orchestration;
  (b) ``cxrd run --once``, workers=1, instant models, fresh DB and bucket;
  (c) studies/min for workers 1, 2, 4, 8 at 1,000 ms per model call, and with instant models;
  (d) peak RSS, and RSS after 50/100/200 studies of a long run with one 4000x4000 image;
  (e) StableStudy -> done latency of a live ``cxrd run`` (poll_interval_s 1).
``--profile`` adds py-spy and pyinstrument profiles of (b) in bench/profiles/.

Quick look: ``make bench BENCH_ARGS=--quick`` (or ``CXRD_BENCH_QUICK=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

import corpus
import cxrd_runs
import experiments
import live
import profiling
import report
import services

RESULTS = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; ``--quick`` (or CXRD_BENCH_QUICK=1) picks small numbers for a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("CXRD_BENCH_QUICK") == "1")  # fmt: skip
    parser.add_argument("--studies", type=int, help="corpus for (a)-(c); default 16, quick 8")
    parser.add_argument("--reps", type=int, help="repetitions per measure; default 3, quick 1")
    parser.add_argument(
        "--throughput-studies",
        type=int,
        help="studies in (c): the corpus plus clones of its mix; default 3 x --studies, quick 1 x",
    )
    parser.add_argument("--latency-ms", type=float, default=1000.0, help="per model call in (c)")
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts for (c)")
    parser.add_argument("--memory-studies", type=int, help="small studies in (d); default 200")
    parser.add_argument("--latency-studies", type=int, help="studies in (e); default 10")
    parser.add_argument("--e-latency-ms", type=float, help="per model call in (e); default = (c)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="(e) poll_interval_s")
    parser.add_argument("--db", choices=("auto", "mysql", "sqlite"), default="auto")
    parser.add_argument(
        "--sections",
        default="abcde",
        help="measures to run, e.g. 'ab' or 'c' (a and b always run together)",
    )
    parser.add_argument(
        "--mix",
        help="comma-separated study kinds instead of the realistic mix "
        f"({', '.join(k for k in corpus.KINDS if k != 'single_4k')})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile (b) into bench/profiles/ (needs py-spy, pyinstrument)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.studies = args.studies or (8 if quick else 16)
    args.reps = args.reps or (1 if quick else 3)
    # Eight workers need many more studies than eight to run in steady state:
    # with 16, a third of the window is ramp-up and drain.
    args.throughput_studies = args.throughput_studies or (1 if quick else 3) * args.studies
    args.memory_studies = args.memory_studies or (60 if quick else 200)
    args.latency_studies = args.latency_studies or (4 if quick else 10)
    args.e_latency_ms = args.latency_ms if args.e_latency_ms is None else args.e_latency_ms
    args.workers = tuple(int(w) for w in args.workers.split(","))
    args.sections = set(args.sections)
    if args.sections & {"a", "b"}:
        args.sections |= {"a", "b"}  # the ratio needs both
    if args.sections != set("abcde") and args.output == RESULTS:
        # A partial run must not overwrite the full results.
        args.output = RESULTS.with_name(f"results-{''.join(sorted(args.sections))}.json")
    kinds = args.mix.split(",") if args.mix else None
    if kinds and not set(kinds) <= set(corpus.KINDS):
        parser.error(f"--mix: unknown kinds {sorted(set(kinds) - set(corpus.KINDS))}")
    args.cycle = kinds
    args.kinds = corpus.mix(args.studies, kinds)
    return args


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind like Ctrl-C: every service is stopped on the way


def main(argv: list[str]) -> int:
    """Run the benchmark; 0 when every run did its work (targets are reported, not enforced)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cxrd-bench-"))
    try:
        with ExitStack() as stack:
            results = _session(stack, args, workdir, began)
    except KeyboardInterrupt:
        print("interrupted: every server and daemon started was stopped", file=sys.stderr)
        return 130
    except experiments.BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if results:
        report.write(results, args.output)
        print(report.table(results, args.output))
    return 0


def _session(
    stack: ExitStack, args: argparse.Namespace, workdir: Path, began: float
) -> dict[str, Any] | None:
    """Sandbox up, corpus in, measurements; the results."""
    kinds = args.kinds
    load_start = report.uptime()
    made = corpus.warm_templates({*kinds, "small", "single_4k"})
    db_kind = (
        args.db if args.db != "auto" else ("mysql" if services.mysql_available() else "sqlite")
    )
    sandbox = services.start(stack, workdir, db_kind)
    studies = corpus.write_studies(workdir / "dicom", kinds)
    uids = [s.study_uid for s in studies]
    ids = services.store(sandbox.orthanc, [f for s in studies for f in s.files], uids)
    instances = services.instance_ids(sandbox.orthanc, [ids[uid] for uid in uids])
    size = sum(s.bytes for s in studies)
    ctx = experiments.Context(sandbox, workdir, studies, instances, args.reps, started=began)
    ctx.say(f"sandbox up, {sandbox.databases.describe()}; templates made: {made or 'none'}")
    ctx.say(f"{len(studies)} studies, {len(instances)} instances, {size / 1e6:.0f} MB stored")
    sections = _measure(ctx, args)
    meta = {
        "studies": len(studies), "instances": len(instances), "bytes": size,
        "corpus": _corpus(studies), "database": sandbox.databases.describe(),
        "repetitions": args.reps, "model_latency_ms": args.latency_ms,
        "workers": list(args.workers), "versions": report.versions(sandbox.orthanc),
        "load": {"start": load_start, "end": report.uptime()},
        "daemon_allocator_env": cxrd_runs.UNIT_ENV,
    }  # fmt: skip
    return _results(meta, sections, time.monotonic() - began)


def _measure(ctx: experiments.Context, args: argparse.Namespace) -> dict[str, Any]:
    """The measures named by ``--sections`` (and ``--profile``), by section name."""
    sections: dict[str, Any] = {}
    w1_instant: list[experiments.Outcome] = []
    if "a" in args.sections:
        sections["ab"], w1_instant = experiments.floor_vs_once(ctx)
    if "c" in args.sections:
        grown = _grow(ctx, args.throughput_studies, args.cycle)
        sections["throughput"] = experiments.throughput(
            grown, w1_instant if grown is ctx else [], args.workers, args.latency_ms
        )
        sections["throughput"]["studies"] = len(grown.corpus)
        ctx = grown  # Orthanc now holds them all: later --once runs drain every one
    if "d" in args.sections:
        sections["memory"] = live.memory(ctx, args.memory_studies)
    if "e" in args.sections:
        sections["latency"] = live.latency(
            ctx, args.latency_studies, args.e_latency_ms, args.poll_interval
        )
    if args.profile:
        sections["profile"] = profiling.profile(ctx)
    return sections


def _grow(ctx: experiments.Context, count: int, cycle: list[str] | None) -> experiments.Context:
    """``ctx`` with its corpus grown to ``count`` studies (same mix, new UIDs) in Orthanc.

    The new studies go to the same Orthanc: every later ``--once`` run drains all
    of them, so they are added only after (a) and (b), which must see the corpus.
    """
    extra = count - len(ctx.corpus)
    if extra <= 0:
        return ctx
    more = corpus.mix(count, cycle)[len(ctx.corpus) :]  # the same cycle, continued
    studies = corpus.write_studies(ctx.workdir / "dicom-c", more, first_number=len(ctx.corpus) + 1)
    uids = [s.study_uid for s in studies]
    orthanc = ctx.sandbox.orthanc
    ids = services.store(orthanc, [f for s in studies for f in s.files], uids)
    instances = services.instance_ids(orthanc, [ids[uid] for uid in uids])
    ctx.say(f"(c) {len(studies)} more studies stored: {count} in all")
    return dataclasses.replace(
        ctx, corpus=[*ctx.corpus, *studies], instances=[*ctx.instances, *instances]
    )


def _corpus(studies: list[corpus.Study]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for study in studies:
        counts[study.kind] = counts.get(study.kind, 0) + 1
    described = {
        "dx16": "DX 2500x3000 16-bit uncompressed, PA + LL",
        "dx16_4k": "DX 4000x4000 16-bit PA + 2500x3000 LL, uncompressed",
        "j2k": "CR MONOCHROME1 2500x3000 12-bit JPEG 2000 lossless, PA + LL",
        "jpegll": "DX 2500x3000 16-bit JPEG Lossless SV1 (dcmcjpeg +e1), PA + LL",
    }
    return {
        "kinds": {kind: {"studies": n, "what": described[kind]} for kind, n in counts.items()},
        "summary": ", ".join(f"{n} {kind}" for kind, n in counts.items()),
    }


def _results(meta: dict[str, Any], sections: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The results file: DESIGN.md's keys first (those measured), then the detail behind them."""
    ab, c, e = sections.get("ab"), sections.get("throughput"), sections.get("latency")
    results: dict[str, Any] = {}
    if ab:
        results.update({key: ab[key] for key in ("floor_s", "once_w1_s", "ratio_once_vs_floor")})
    if c:
        results["throughput_per_min"] = c["throughput_per_min"]
        results["cpu_bound_per_min"] = c["cpu_bound_per_min"]
        results["scaling_w8_vs_w1"] = c["scaling_last_vs_first"]
    if ab:
        results["peak_rss_mb"] = ab["peak_rss_mb"]
    if e:
        results["event_to_done_s"] = e["event_to_done_s"]
    return {
        **results,
        "studies": meta["studies"],
        "instances": meta["instances"],
        "bytes": meta["bytes"],
        "machine": report.machine(),
        **{k: v for k, v in meta.items() if k not in {"studies", "instances", "bytes"}},
        **sections,
        "bench_wall_s": round(wall_s, 1),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
