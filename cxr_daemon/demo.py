"""``cxrd demo``: the whole pipeline on one machine, from sample images to results.

A sandbox on 127.0.0.1 only: a real Orthanc (private storage, StableAge 2 s,
DICOMweb on), a local S3 (moto in server mode), the reference model server
(NOT a medical model) and the embedded SQLite database. Phantom chest X-rays
with fake patients, and one CT to show a skip, reach Orthanc by C-STORE as
from a modality; the daemon runs in-process, printing each step, until every
study is finished; then a table per study and an overlay PNG per image.
Everything started is stopped on the way out, on Ctrl-C and SIGTERM too.
Nothing leaves the machine: S3 and the models are local, the report is the
template backend.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import boto3
import requests
import structlog
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from cxr_daemon import bootstrap, config, logconf
from cxr_daemon.domain import StudyState
from cxr_daemon.errors import CxrdError
from cxr_daemon.modelserver import ModelServer
from cxr_daemon.overlay import study_view
from cxr_daemon.sandbox.awsenv import SANDBOX_AWS, sandbox_aws_env
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import DICOMWEB_PLUGIN, OrthancProcess
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom, write_non_cxr
from cxr_daemon.sandbox.processes import find_program
from cxr_daemon.worker import Daemon

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from cxr_daemon.ports import StudyRow

STABLE_AGE_S = 2
BUCKET, PREFIX, REGION = "cxrd-demo", "demo", "us-east-1"
# The sandbox needs no AWS identity: these only satisfy boto3's credential chain
# (which would otherwise probe instance metadata) and only moto ever sees them.
FINAL = {StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED}
IMAGE_STEPS = {"download", "render", "archive", "segment", "classify"}
JOIN_S = 60.0
# Samples: name, what it shows, phantom arguments per image (small: quick); None = a CT.
PHANTOM: dict[str, Any] = {"rows": 512, "cols": 512}
SAMPLES: tuple[tuple[str, str, tuple[dict[str, Any], ...] | None], ...] = (
    ("dx-two-views", "DX MONOCHROME2 uncompressed 12-bit, PA + LL",
     ({"view_position": "PA", "rows": 640}, {"view_position": "LL", "rows": 640, "seed": 1})),
    ("cr-mono1-j2k", "CR MONOCHROME1 JPEG 2000 lossless 12-bit",
     ({"modality": "CR", "photometric": "MONOCHROME1", "transfer_syntax": JPEG2000Lossless,
       "seed": 2},)),
    ("dx-jpeg-8bit", "DX MONOCHROME2 JPEG baseline 8-bit",
     ({"transfer_syntax": JPEGBaseline8Bit, "bits_stored": 8, "rows": 576, "seed": 3},)),
    ("ct-not-a-cxr", "CT slice: not a chest X-ray, cxrd skips it", None),
)  # fmt: skip
PATIENTS = ("ALPHA", "BRAVO", "CHARLIE", "DELTA")


class DemoError(Exception):
    """The sandbox cannot run here (missing program, unusable work directory)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM (the signal number is its argument): unwind like KeyboardInterrupt."""


@dataclass(frozen=True)
class Sample:
    """One sample study: short name, what it is, its UID, its files, whether it is a CXR."""

    name: str
    description: str
    study_uid: str
    files: tuple[Path, ...]
    cxr: bool = True


@dataclass(frozen=True)
class Sandbox:
    """The started servers: Orthanc, and the URLs of the local S3 and the model server."""

    orthanc: OrthancProcess
    s3_url: str
    models_url: str


class Console:
    """Lines on stdout, timestamped from the start, flushed at once; safe from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._start, self._lock = stream, time.monotonic(), threading.Lock()

    def say(self, text: str) -> None:
        """One timestamped line."""
        self.raw(f"[{time.monotonic() - self._start:6.1f}s] {text}")

    def raw(self, text: str) -> None:
        """Text as is (tables)."""
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()


class Progress:
    """The core's ``Metrics`` port: prints each step and each finished study as they happen."""

    def __init__(self, console: Console, samples: list[Sample]) -> None:
        self._console = console
        self._samples = {s.study_uid: s for s in samples}
        self._images: dict[str, int] = {}  # images started, per study
        self._finished: set[str] = set()

    def _study(self) -> tuple[str, str, int]:
        """UID, name and image count of the study the calling worker is on."""
        uid = str(structlog.contextvars.get_contextvars().get("study_uid", ""))
        sample = self._samples.get(uid)
        return uid, sample.name if sample else uid, len(sample.files) if sample else 0

    def poll_succeeded(self) -> None:
        """Feed pages show up as queue changes instead."""

    def step_observed(self, step: str, seconds: float) -> None:
        """One line per step: study, image n/N (or the study as a whole), duration."""
        uid, name, total = self._study()
        if step == "download":
            self._images[uid] = self._images.get(uid, 0) + 1
        where = f"image {self._images.get(uid, 0)}/{total}" if step in IMAGE_STEPS else "study"
        self._console.say(f"  {name:<14} {where:<9} {step:<9} {seconds * 1000:5.0f} ms")

    def study_finished(self, state: str) -> None:
        """One line per study leaving ``running``, with how many are finished."""
        uid, name, _total = self._study()
        if state in FINAL:
            self._finished.add(uid)
        self._console.say(f"finished {len(self._finished)}/{len(self._samples)}: {name} {state}")


def run_demo(keep: bool = False, workdir: Path | None = None, timeout_s: float = 180.0) -> int:
    """Run the demo; return the exit code: 0 as expected, 1 not, 2 cannot run, 128+signal."""
    console = Console(sys.stdout)
    try:
        _require_tools()
        folder = _workdir(workdir)
    except DemoError as exc:
        sys.stderr.write(f"cxrd: demo: {exc}\n")
        return 2
    keep = keep or workdir is not None
    stop = threading.Event()
    code = 1
    with _signals(stop):
        try:
            code = 0 if _run(folder, console, stop, timeout_s, keep=keep) else 1
        except Interrupted as exc:
            name = signal.Signals(exc.args[0]).name
            console.say(f"{name}: stopped the daemon, Orthanc, the local S3 and the model server")
            code = 128 + exc.args[0]
        except (CxrdError, OSError, RuntimeError, ValueError, BotoCoreError, ClientError) as exc:
            console.say(f"demo failed: {exc}")
        _tidy(folder, console, keep=keep or code == 1)
    return code


def _require_tools() -> None:
    """Raise DemoError naming every missing program or package."""
    missing = [
        f"{program} (apt-get install {package})"
        for program, package in (("Orthanc", "orthanc"), ("storescu", "dcmtk"))
        if not _installed(program)
    ]
    if not DICOMWEB_PLUGIN.is_file():
        missing.append("the Orthanc DICOMweb plugin (apt-get install orthanc-dicomweb)")
    if importlib.util.find_spec("moto") is None:
        missing.append("moto, the local S3 (pip install 'moto[server]')")
    if missing:
        raise DemoError("missing " + "; ".join(missing) + " (`make demo` installs them as root)")


def _installed(program: str) -> bool:
    try:
        find_program(program)
    except FileNotFoundError:
        return False
    return True


def _workdir(path: Path | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="cxrd-demo-"))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DemoError(f"--workdir {path} must be a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    """The first SIGINT/SIGTERM raises Interrupted in the main thread; later ones wait."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():  # already stopping: never cut the clean-up short
            os.write(2, b"cxrd: demo: stopping, please wait\n")
            return
        stop.set()
        # os.write, not Console: the interrupted code may hold the console's lock.
        os.write(1, f"{signal.Signals(signum).name}: stopping what the demo started\n".encode())
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(
    folder: Path, console: Console, stop: threading.Event, timeout_s: float, *, keep: bool
) -> bool:
    """Sandbox up, samples in, daemon until done, results out; True if all went as expected."""
    console.say(f"cxrd demo: a sandbox on 127.0.0.1 in {folder}; nothing leaves this machine")
    with ExitStack() as stack:
        stack.enter_context(sandbox_aws_env())
        log_file = stack.enter_context((folder / "cxrd.log").open("a", encoding="utf-8"))
        logconf.configure("json", "info", stream=log_file)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
        stack.callback(logconf.configure, "auto", "warning")
        try:
            sandbox = _start_servers(stack, folder, console)
            app = _build(stack, folder, sandbox, console, stop)
            samples = _send_samples(folder, sandbox.orthanc.dicom_port, console)
            rows = _process(stack, app, samples, console, timeout_s)
        finally:
            stop.set()  # before the stack unwinds: the daemon thread stops first
        s3 = _s3_client(sandbox.s3_url)
        ok = _report(samples, rows, s3, folder, console)
        if keep:
            _mirror(s3, folder / "s3", console)
        console.say("stopping the daemon, Orthanc, the local S3 and the model server")
        return ok


def _start_servers(stack: ExitStack, folder: Path, console: Console) -> Sandbox:
    """Orthanc, moto and the model server, each stopped when ``stack`` closes."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - optional, checked first

    orthanc = OrthancProcess(folder / "orthanc", stable_age_s=STABLE_AGE_S)
    stack.callback(orthanc.stop)
    orthanc.start()
    system = requests.get(f"{orthanc.url}/system", auth=orthanc.auth, timeout=10).json()
    console.say(
        f"Orthanc {system.get('Version', '?')}: {orthanc.url}, DICOM port "
        f"{orthanc.dicom_port}, StableAge {STABLE_AGE_S} s, config {orthanc.config_path}"
    )
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()  # port 0: the kernel picks a free one, no race with other processes
    stack.callback(moto.stop)
    s3_url = "http://{}:{}".format(*moto.get_host_and_port())
    _s3_client(s3_url).create_bucket(Bucket=BUCKET)
    console.say(f"local S3 (moto): {s3_url}, bucket {BUCKET}")
    models = ModelServer()
    stack.callback(models.stop)
    models.start()
    console.say(f"reference model server (NOT a medical model): {models.url}")
    return Sandbox(orthanc, s3_url, models.url)


def _config_text(folder: Path, sandbox: Sandbox) -> str:
    """The sandbox's config: embedded defaults (SQLite, template report), local endpoints."""
    orthanc, models, q = sandbox.orthanc, sandbox.models_url, json.dumps  # JSON str = TOML str
    return f"""# cxrd demo sandbox: every service on 127.0.0.1, stopped when the demo ends.
[orthanc]
url = {q(orthanc.url)}
username = {q(orthanc.auth[0])}
password = {q(orthanc.auth[1])}  # a throwaway sandbox account
poll_interval_s = 0.5
start_from = "beginning"

[s3]
bucket = {q(BUCKET)}
prefix = {q(PREFIX)}
region = {q(REGION)}
endpoint_url = {q(sandbox.s3_url)}

[inference]
backend = "http"
segmentation_endpoint = {q(models + "/segmentation")}
classification_endpoint = {q(models + "/classification")}

[report]
backend = "template"

[database]
url = {q("sqlite://" + str(folder / "cxrd.db"))}

[pipeline]
retry_backoff_s = [1, 2, 5]
"""


def _build(
    stack: ExitStack, folder: Path, sandbox: Sandbox, console: Console, stop: threading.Event
) -> bootstrap.App:
    """Write and load the config, wire the daemon, migrate the database."""
    path = folder / "cxrd.toml"
    path.write_text(_config_text(folder, sandbox), encoding="utf-8")
    app = bootstrap.build(config.load(path), stop)
    stack.callback(app.close)
    before, after = app.store.migrate()  # what `cxrd db migrate` does
    console.say(f"config {path}, logs {folder / 'cxrd.log'}")
    console.say(f"database {app.cfg.database.url}: schema migrated from v{before} to v{after}")
    return app


def write_samples(folder: Path) -> list[Sample]:
    """Phantom studies with obviously fake patients: three chest X-rays and one CT."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for n, (name, description, images) in enumerate(SAMPLES, start=1):
        uid = str(new_uid())
        who: dict[str, Any] = {
            "study_uid": uid,
            "patient_name": f"DEMO^{PATIENTS[n - 1]}",
            "patient_id": f"DEMO-{n:04d}",
            "accession": f"DEMO{n:04d}",
        }
        if images is None:
            files: tuple[Path, ...] = (write_non_cxr(folder / f"{name}.dcm", "CT", **who),)
        else:
            files = tuple(
                write_chest_phantom(folder / f"{name}-{i}.dcm", **who, **{**PHANTOM, **image})
                for i, image in enumerate(images, start=1)
            )
        samples.append(Sample(name, description, uid, files, cxr=images is not None))
    return samples


def _send_samples(folder: Path, dicom_port: int, console: Console) -> list[Sample]:
    """Write the samples and C-STORE them to Orthanc."""
    samples = write_samples(folder / "dicom")
    count = sum(len(s.files) for s in samples)
    console.say(f"wrote {count} images in {len(samples)} studies (fake patients DEMO^...):")
    for s in samples:
        console.raw(f"{'':11}{s.name:<14} {s.description}")
    send_files([f for s in samples for f in s.files], host="127.0.0.1", port=dicom_port)
    console.say("sent them to Orthanc by C-STORE (storescu), as a modality would")
    return samples


def _process(
    stack: ExitStack, app: bootstrap.App, samples: list[Sample], console: Console,
    timeout_s: float,
) -> dict[str, StudyRow | None]:  # fmt: skip
    """Run the daemon in a thread until the samples are finished (or the timeout passes)."""
    # Progress becomes the core's Metrics port (bootstrap wires the no-op one).
    progress = Progress(console, samples)
    app.ports = dataclasses.replace(app.ports, metrics=progress)
    app.pipeline.ports = app.ports
    app.worker.metrics = app.poller.metrics = progress
    thread = threading.Thread(target=_daemon, args=(app,), name="cxrd-demo-daemon", daemon=True)
    stack.callback(thread.join, JOIN_S)
    thread.start()
    console.say(f"daemon started: polls /changes every {app.cfg.orthanc.poll_interval_s} s")
    return _wait(app, samples, thread, console, timeout_s)


def _daemon(app: bootstrap.App) -> None:
    """The daemon loop, as ``cxrd run`` runs it, until the stop event."""
    try:
        app.poller.prime()
        Daemon(app.poller, app.worker, app.stop, app.cfg.orthanc.poll_interval_s).run()
    except CxrdError as exc:  # the main thread sees the thread end and says so
        structlog.get_logger(__name__).error("demo_daemon_failed", error=str(exc))


def _wait(
    app: bootstrap.App, samples: list[Sample], thread: threading.Thread, console: Console,
    timeout_s: float,
) -> dict[str, StudyRow | None]:  # fmt: skip
    """Until every sample study is finished, the daemon stops, or the timeout passes."""
    deadline, shown = time.monotonic() + timeout_s, ""
    while True:
        rows = {s.study_uid: app.store.study_row(s.study_uid) for s in samples}
        states = [row.state.value if row else "not in the feed yet" for row in rows.values()]
        line = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        if line != shown:
            console.say(f"queue: {line}")
            shown = line
        if all(state in FINAL for state in states):
            return rows
        if not thread.is_alive():
            console.say(f"the daemon stopped; see {app.cfg.path.parent / 'cxrd.log'}")
            return rows
        if time.monotonic() > deadline:
            left = [f"{s.name} ({st})" for s, st in zip(samples, states, strict=True)
                    if st not in FINAL]  # fmt: skip
            console.say(f"timed out after {timeout_s:.0f} s; unfinished: {', '.join(left)}")
            return rows
        time.sleep(0.2)


def _s3_client(url: str) -> S3Client:
    """A client of the local S3 alone, with the sandbox's dummy credentials."""
    return boto3.session.Session().client(
        "s3", endpoint_url=url, region_name=REGION,
        aws_access_key_id=SANDBOX_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SANDBOX_AWS["AWS_SECRET_ACCESS_KEY"],
        config=BotoConfig(s3={"addressing_style": "path"}),
    )  # fmt: skip


def _keys(s3: S3Client, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _get(s3: S3Client, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _report(
    samples: list[Sample], rows: dict[str, StudyRow | None], s3: S3Client, folder: Path,
    console: Console,
) -> bool:  # fmt: skip
    """A table per study, overlays per image; True if CXRs are done and the rest skipped."""
    console.raw("\nResults (reference model server: NOT a medical model, NOT a diagnosis)")
    ok = True
    for sample in samples:
        row = rows[sample.study_uid]
        state = row.state if row else None
        console.raw(f"\n{sample.name}: {state or 'never queued'}  ({sample.description})")
        console.raw(f"  study {sample.study_uid}")
        ok &= state is (StudyState.DONE if sample.cxr else StudyState.SKIPPED)
        if state is StudyState.DONE:
            _study_table(sample, s3, folder / "overlays", console)
        elif row is not None and row.reason:
            console.raw(f"  reason: {row.reason}")
    done = sum(1 for r in rows.values() if r and r.state is StudyState.DONE)
    overlays = folder / "overlays"
    where = f", overlays in {overlays}" if overlays.is_dir() else ""
    console.raw(f"\n{'OK' if ok else 'NOT OK'}: {done} of {sum(s.cxr for s in samples)} chest"
                f" X-ray studies done{where}")  # fmt: skip
    return ok


def _study_table(sample: Sample, s3: S3Client, overlays: Path, console: Console) -> None:
    """The study's table, from what S3 holds; its overlays written to ``overlays``."""
    root = f"{PREFIX}/studies/{sample.study_uid}/"
    view = study_view(sample.name, root, lambda key: _get(s3, key), _keys(s3, root))
    overlays.mkdir(parents=True, exist_ok=True)
    for file_name, image in view.overlays.items():
        image.save(overlays / file_name, format="PNG")
    console.raw("\n".join(view.lines).replace(f"  S3 {root}", f"  S3 s3://{BUCKET}/{root}"))


def _mirror(s3: S3Client, target: Path, console: Console) -> None:
    """Copy the bucket to ``target``: moto keeps it in memory only."""
    keys = _keys(s3, "")
    for key in keys:
        (target / key).parent.mkdir(parents=True, exist_ok=True)
        (target / key).write_bytes(_get(s3, key))
    console.say(f"copied the {len(keys)} objects of the local S3 to {target}")


def _tidy(folder: Path, console: Console, *, keep: bool) -> None:
    """Remove the sandbox's files, except the overlays, unless kept."""
    if keep:
        console.say(f"kept the sandbox's files in {folder}")
        return
    for child in folder.iterdir():
        if child.name != "overlays":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if any(folder.iterdir()):
        console.say(f"removed the sandbox's files; overlays kept in {folder / 'overlays'}")
    else:
        folder.rmdir()
        console.say("removed the sandbox's files")
