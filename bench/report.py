"""bench/results.json and the table printed at the end of ``make bench``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import requests

from cxr_daemon import __version__
from cxr_daemon.sandbox.orthanc import OrthancProcess

TARGET_RATIO = 1.3
TARGET_SCALING = 6.0
RSS_LIMIT_MB = 300.0


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, kernel, Python."""
    meminfo = Path("/proc/meminfo").read_text(encoding="ascii")
    total_kib = int(next(line for line in meminfo.splitlines() if line.startswith("MemTotal"))
                    .split()[1])  # fmt: skip
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cores": os.cpu_count(),
        "memory_mb": round(total_kib / 1024),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def uptime() -> str:
    """``uptime``'s line (load averages while the benchmark ran)."""
    done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def versions(orthanc: OrthancProcess) -> dict[str, str]:
    """cxrd, Orthanc and git commit the numbers belong to."""
    system = requests.get(f"{orthanc.url}/system", auth=orthanc.auth, timeout=10).json()
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "cxr_daemon"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return {
        "cxrd": __version__,
        "orthanc": str(system.get("Version", "?")),
        "git": commit + ("+uncommitted cxr_daemon changes" if dirty else ""),
    }


def write(results: dict[str, Any], path: Path) -> None:
    """Write the results file (stable key order: the required keys first)."""
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _ok(condition: bool | None) -> str:
    if condition is None:
        return ""
    return "yes" if condition else "NO"


def _row(name: str, value: str, target: str = "", ok: bool | None = None) -> str:
    return f"  {name:<48} {value:>17}   {target:<14} {_ok(ok)}".rstrip()


def _header(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    return [
        (f"cxrd benchmark: {r['studies']} studies, {r['instances']} instances, "
         f"{r['bytes'] / 1e6:.0f} MB in Orthanc ({r['corpus']['summary']})"),
        (f"machine: {m['cores']} cores, {m['memory_mb'] / 1024:.1f} GB, {m['cpu']}; "
         f"DB {r['database']}; {r['repetitions']} repetitions, medians"),
        f"load at start: {r['load']['start']}",
        f"load at end:   {r['load']['end']}",
        "",
        f"  {'measure':<48} {'value':>17}   {'target/note':<14} met",
    ]  # fmt: skip


def _floor_rows(r: dict[str, Any]) -> list[str]:
    ratio = r["ratio_once_vs_floor"]
    return [
        _row("(a) floor: straight-line script", f"{r['floor_s']:.2f} s"),
        _row("(b) cxrd run --once, workers=1, instant models", f"{r['once_w1_s']:.2f} s"),
        _row("    ratio (b)/(a), wall clock", f"{ratio:.2f}", f"<= {TARGET_RATIO}",
             ratio <= TARGET_RATIO),
        _row("    ratio, processing only (no start-up)", f"{r['ab']['ratio_in_process']:.2f}"),
        _row(f"(d) peak RSS of (b), workers=1 (max {r['ab']['peak_rss_mb_max']:.0f})",
             f"{r['peak_rss_mb']:.0f} MB", f"< {RSS_LIMIT_MB:g} MB",
             r["ab"]["peak_rss_mb_max"] < RSS_LIMIT_MB),
    ]  # fmt: skip


def _throughput_rows(r: dict[str, Any]) -> list[str]:
    c, latency = r["throughput"], r["model_latency_ms"]
    rows = [_row(f"(c) throughput, {c.get('studies', r['studies'])} studies per run", "")]
    for workers, rate in r["throughput_per_min"].items():
        flight = c["in_flight_max"][f"{latency:g}ms"][workers]
        rows.append(_row(f"(c) {latency:g} ms/model call, workers={workers}",
                         f"{rate:.1f}/min", f"in flight {flight}"))  # fmt: skip
    first, last = next(iter(r["throughput_per_min"])), list(r["throughput_per_min"])[-1]
    instant = c["cpu_bound_by_workers_per_min"]
    best = max(instant, key=instant.get)
    scaling = r["scaling_w8_vs_w1"]
    return [
        *rows,
        _row(f"    scaling w{last}/w1", f"{scaling:.2f}x", f">= {TARGET_SCALING:g}x",
             scaling >= TARGET_SCALING),
        _row("    instant models: " + ", ".join(f"w{w} {v:.0f}" for w, v in instant.items()),
             ""),
        _row("    CPU-bound max (instant models)", f"{r['cpu_bound_per_min']:.1f}/min",
             f"at w={best}"),
        _row("    daemon cores busy, instant: " + ", ".join(
            f"w{w} {v:.2f}" for w, v in c["daemon_cores_busy"]["0ms"].items()), ""),
        _row("    peak RSS: " + ", ".join(
            f"w{w} {v:.0f}" for w, v in c["peak_rss_mb_by_workers"].items()) + " MB", ""),
        *(_row(f"    cores busy, w{w} {lat}: " + ", ".join(
            f"{name} {v:.2f}" for name, v in c["cores_by_process"][lat][w].items()), "")
          for lat in c.get("cores_by_process", {}) for w in dict.fromkeys((first, last))),
    ]  # fmt: skip


def _memory_rows(r: dict[str, Any]) -> list[str]:
    d = r["memory"]
    rows = []
    for mark, rss in d["rss_mb_after"].items():
        label = f"after {mark} studies" if mark.isdigit() else mark.replace("_", " ")
        rows.append(_row(f"(d) memory run: RSS / peak {label}",
                         f"{rss:.0f} / {d['peak_rss_mb_after'][mark]:.0f} MB"))  # fmt: skip
    rows.append(_row(f"    memory run peak ({d['studies']} studies)", f"{d['peak_rss_mb']:.0f} MB",
                     f"< {RSS_LIMIT_MB:g} MB", d["under_300_mb"]))  # fmt: skip
    return rows


def _latency_rows(r: dict[str, Any]) -> list[str]:
    e = r["latency"]

    def pair(key: str) -> str:
        return f"{e[key]['p50']:.2f} / {e[key]['p95']:.2f} s"

    target = e["target_beyond_model_s"]
    return [
        _row(f"(e) StableStudy->done p50/p95, {e['model_latency_ms']:g} ms/call",
             pair("event_to_done_s"), f"n={e['studies']}"),
        _row("    StableStudy->taken p50/p95", pair("event_to_claim_s"),
             f"poll {e['poll_interval_s']:g} s"),
        _row("    beyond model time p50/p95", pair("beyond_model_time_s"), f"<= {target:g} s",
             e["beyond_model_time_s"]["p95"] <= target),
    ]  # fmt: skip


def table(r: dict[str, Any], path: Path) -> str:
    """The human summary of the results ``r`` (written to ``path``)."""
    parts = ((_floor_rows, "ab"), (_throughput_rows, "throughput"), (_memory_rows, "memory"),
             (_latency_rows, "latency"))  # fmt: skip
    lines = [
        *_header(r),
        *(line for rows, key in parts if key in r for line in rows(r)),
        "",
        f"benchmark wall time {r['bench_wall_s'] / 60:.1f} min; results in {path}",
    ]  # fmt: skip
    return "\n".join(lines)
