"""Running the real ``cxrd`` command: configs, ``db migrate``, measured and live runs.

Every run is a subprocess of the installed console script, as systemd would run
it. Peak RSS is the kernel's high-water mark of that process (``VmHWM`` in
/proc/<pid>/status), read every 20 ms while it runs: it only ever grows, so the
last reading is the peak but for the last few ms before exit. (``wait4``'s
``ru_maxrss`` cannot be used: Linux carries the parent's RSS at fork into the
child's maximum across exec, so a child of a big harness reports the harness.)
Per-study timings come from its JSON log lines (``study_finished`` carries the
UTC timestamp and the study's duration, ``run_steps`` the per-step seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from services import AWS_ENV, REGION, STABLE_AGE_S

from cxr_daemon.sandbox.orthanc import OrthancProcess

CXRD = str(Path(sys.executable).parent / "cxrd")
PREFIX = "bench"
MAX_SIDE = 1024
POLL_S = 0.005  # exit detection granularity, part of every measured wall time


@dataclass(frozen=True)
class Finished:
    """One ``study_finished`` log line: when (epoch seconds), how long, in what state."""

    study_uid: str
    state: str
    end: float
    duration_s: float

    @property
    def start(self) -> float:
        """When the worker took the study (end minus its duration)."""
        return self.end - self.duration_s


@dataclass
class Outcome:
    """What one ``cxrd`` process did and cost."""

    code: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    log: Path
    finished: list[Finished] = field(default_factory=list)
    steps_s: dict[str, float] = field(default_factory=dict)
    services_cpu_s: dict[str, float] = field(default_factory=dict)  # the sandbox's, same window

    def done(self) -> int:
        """Studies finished in state done."""
        return sum(1 for f in self.finished if f.state == "done")

    def cores(self) -> float:
        """Average cores the process kept busy (CPU seconds over wall seconds)."""
        return self.cpu_s / self.wall_s

    def cores_by_process(self) -> dict[str, float]:
        """Average cores kept busy by the daemon and by each sandbox service."""
        used = {"cxrd": self.cpu_s, **self.services_cpu_s}
        return {name: round(seconds / self.wall_s, 3) for name, seconds in used.items()}

    def span_s(self) -> float:
        """First study taken to last study finished: the processing window."""
        if not self.finished:
            return float("nan")
        return max(f.end for f in self.finished) - min(f.start for f in self.finished)

    def concurrency(self) -> int:
        """Most studies in flight at once (1 when ``workers`` is not in effect)."""
        events = sorted(
            [(f.start, 1) for f in self.finished] + [(f.end, -1) for f in self.finished],
            key=lambda e: (e[0], e[1]),
        )
        level = peak = 0
        for _when, change in events:
            level += change
            peak = max(peak, level)
        return peak


def write_config(
    path: Path,
    orthanc: OrthancProcess,
    *,
    s3_url: str,
    bucket: str,
    models_url: str,
    db_url: str,
    workers: int = 1,
    start_from: str = "beginning",
    poll_interval_s: float = 1.0,
) -> Path:
    """A cxrd config for one run: the sandbox's services, ``workers``, the template report."""
    user, password = orthanc.auth
    q = json.dumps  # a JSON string is a TOML basic string
    path.write_text(
        f"""# cxrd benchmark run (bench/run.py)
[orthanc]
url = {q(orthanc.url)}
username = {q(user)}
password = {q(password)}
timeout_s = 60
poll_interval_s = {poll_interval_s}
page_size = 100
start_from = {q(start_from)}
stable_age_s = {STABLE_AGE_S}

[s3]
bucket = {q(bucket)}
prefix = {q(PREFIX)}
region = {q(REGION)}
endpoint_url = {q(s3_url)}

[inference]
backend = "http"
segmentation_endpoint = {q(models_url + "/segmentation")}
classification_endpoint = {q(models_url + "/classification")}
max_side = {MAX_SIDE}
timeout_s = 70

[report]
backend = "template"

[database]
url = {q(db_url)}

[pipeline]
workers = {workers}
retry_backoff_s = [1, 2]

[log]
format = "json"
level = "info"
""",
        encoding="utf-8",
    )
    return path


UNIT = Path(__file__).resolve().parents[1] / "systemd" / "cxrd.service"


def unit_allocator_env() -> dict[str, str]:
    """The glibc allocator settings systemd/cxrd.service ships: measured as shipped."""
    found = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment=MALLOC_"):
            key, _, value = line.removeprefix("Environment=").partition("=")
            found[key] = value
    return found


UNIT_ENV = unit_allocator_env()


def environment() -> dict[str, str]:
    """Every cxrd process's environment: ours, the unit's allocator, a dummy AWS identity."""
    return {**os.environ, **UNIT_ENV, **AWS_ENV}


def migrate(config: Path) -> None:
    """``cxrd db migrate`` (outside any timing).

    Raises:
        RuntimeError: it failed; the message holds its output.
    """
    done = subprocess.run(
        [CXRD, "db", "migrate", "--config", str(config)],
        capture_output=True, text=True, env=environment(), timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"cxrd db migrate failed: {done.stdout}{done.stderr}")


class PeakRss:
    """Follows VmHWM of a live process from a thread until it exits."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self.interval_s = interval_s
        self.thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            status = proc_status(self.pid)
            if not status or status.get("VmHWM") is None:
                return  # gone (or a zombie, whose memory is already released)
            self.peak_mb = max(self.peak_mb, status["VmHWM"])
            time.sleep(self.interval_s)

    def result(self) -> float:
        """The peak seen (call once the process has exited)."""
        self.thread.join(5)
        return self.peak_mb


def _reap(proc: subprocess.Popen[Any], peak: PeakRss) -> tuple[int, float, float]:
    """Wait for ``proc`` with wait4: exit code, peak RSS (MB), CPU seconds (user + system).

    CPU times, unlike ``ru_maxrss``, start from zero in a new process. wait4 is
    polled, not blocking: Ctrl-C may be delivered to another thread, and a
    blocked main thread would only see it when the run ends.
    """
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, peak.result(), usage.ru_utime + usage.ru_stime


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until true or ``timeout_s``; short sleeps keep Ctrl-C prompt."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _end(proc: subprocess.Popen[Any]) -> None:
    """Interrupted: SIGTERM the process group, SIGKILL after 10 s; reap it."""
    if proc.returncode is not None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(command: list[str], log: Path, stdout: IO[bytes] | int = subprocess.DEVNULL) -> Outcome:
    """Run ``command`` to completion: wall time, peak RSS, stderr to ``log``."""
    with log.open("wb") as err:
        began = time.perf_counter()
        # Its own session: a terminal's Ctrl-C reaches us, and we end it in order.
        proc = subprocess.Popen(
            command, stdout=stdout, stderr=err, env=environment(), start_new_session=True
        )
        peak = PeakRss(proc.pid)
        try:
            code, rss, cpu = _reap(proc, peak)
        except BaseException:
            _end(proc)
            raise
        wall = time.perf_counter() - began
    finished, steps = parse_log(log)
    return Outcome(code, wall, rss, cpu, log, finished, steps)


def run_once(config: Path, log: Path, wrapper: tuple[str, ...] = ()) -> Outcome:
    """``cxrd run --once`` (optionally under a profiler ``wrapper``), measured."""
    return measure([*wrapper, CXRD, "run", "--once", "--config", str(config)], log)


def _timestamp(text: str) -> float:
    """Epoch seconds of structlog's UTC ISO timestamp."""
    return datetime.fromisoformat(text).timestamp()


def parse_record(record: dict[str, Any]) -> Finished | None:
    """The ``study_finished`` record as a Finished, else None."""
    if record.get("event") != "study_finished":
        return None
    return Finished(
        str(record.get("study_uid")),
        str(record.get("state")),
        _timestamp(record["timestamp"]),
        float(record.get("duration_s") or 0.0),
    )


def parse_log(path: Path) -> tuple[list[Finished], dict[str, float]]:
    """Finished studies and per-step seconds (summed over runs) from a JSON log."""
    finished: list[Finished] = []
    steps: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        study = parse_record(record)
        if study is not None:
            finished.append(study)
        for step, seconds in (record.get("durations_s") or {}).items():
            if record.get("event") == "run_steps":
                steps[step] = steps.get(step, 0.0) + float(seconds)
    return finished, steps


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak so far) of a live process, in MB; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            values[key] = int(rest.split()[0]) / 1024
    return values


class LiveDaemon:
    """``cxrd run [--once]`` in the background; each JSON log record goes to ``on_record``.

    The callback runs in the reader thread, so it sees the daemon's state (its
    /proc status) at the moment the line was written, give or take a read.
    """

    def __init__(
        self, config: Path, log: Path, on_record: Callable[[dict[str, Any]], None], *, once: bool
    ) -> None:
        self.log_path = log
        self.on_record = on_record
        self.began = time.perf_counter()
        command = [CXRD, "run", *(["--once"] if once else []), "--config", str(config)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment(),
            start_new_session=True,
        )  # fmt: skip
        self.peak = PeakRss(self.proc.pid)
        self.started = threading.Event()  # its checkpoint is read: it is polling the feed
        self.reader = threading.Thread(target=self._read, name="cxrd-log", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None  # noqa: S101 - set by Popen above
        with self.log_path.open("wb") as out:
            for raw in self.proc.stderr:
                out.write(raw)
                out.flush()
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                if record.get("event") == "daemon_started":
                    self.started.set()
                self.on_record(record)
        self.started.set()  # it ended: nobody should wait for it any longer

    def alive(self) -> bool:
        """Whether it still runs (without reaping it: wait4 must get its rusage later)."""
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def finish(self, *, terminate: bool) -> Outcome:
        """SIGTERM it (when ``terminate``), wait for its exit; the measured outcome."""
        try:
            if terminate and self.alive():
                # os.kill, not send_signal: Popen.poll() would reap it and lose wait4's
                # rusage. Never reaped, an exited child is a zombie: its pid is still its own.
                os.kill(self.proc.pid, signal.SIGTERM)
            code, rss, cpu = _reap(self.proc, self.peak)
        except BaseException:
            _end(self.proc)
            raise
        wall = time.perf_counter() - self.began
        self.reader.join(30)
        finished, steps = parse_log(self.log_path)
        return Outcome(code, wall, rss, cpu, self.log_path, finished, steps)

    def kill(self) -> None:
        """End it now (an interrupted benchmark)."""
        _end(self.proc)
