"""`cxrd demo` as a user runs it: a subprocess without a TTY, on the real sandbox."""

from __future__ import annotations

import os
import queue
import re
import signal
import sqlite3
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cxr_daemon.overlay import BOX_COLOUR, LABELS
from cxr_daemon.sandbox.orthanc import DICOMWEB_PLUGIN
from cxr_daemon.sandbox.processes import find_program
from tests.support import unavailable
from tests.support.daemon import CXRD

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _sandbox_programs() -> None:
    """Skip (fail under CI=true) when the demo's programs are not installed."""
    try:
        find_program("Orthanc")
        find_program("storescu")
    except FileNotFoundError as exc:
        unavailable(f"cxrd demo needs Orthanc and dcmtk: {exc}")
    if not DICOMWEB_PLUGIN.is_file():
        unavailable(f"cxrd demo needs the DICOMweb plugin ({DICOMWEB_PLUGIN})")


def running(pattern: str) -> list[str]:
    """Command lines of live processes whose command line contains `pattern`."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


class Demo:
    """`cxrd demo` in the background, its stdout (stderr merged) read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*CXRD, "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The first line containing `text`; fails if the demo ends or times out first."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line with {text!r} in {timeout} s:\n{self.output()}")
            if line is None:
                pytest.fail(f"demo ended before {text!r}:\n{self.output()}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 120) -> int:
        """Wait for the exit code; the whole output is then in `lines`."""
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def orthanc_config(demo: Demo) -> str:
    """The private Orthanc's config path, from the demo's "Orthanc ..." line."""
    match = re.search(r"config (\S+/orthanc/config\.json)", demo.wait_for("Orthanc "))
    assert match, demo.output()
    return match.group(1)


def test_demo_processes_every_cxr_writes_overlays_and_stops_everything(tmp_path: Path) -> None:
    """`cxrd demo --workdir` exits 0: 3 CXR studies done, the CT skipped, one overlay per image."""
    workdir = tmp_path / "demo"
    demo = Demo("--workdir", str(workdir), "--timeout", "120")
    config = orthanc_config(demo)
    assert running(config), "the demo's Orthanc should be running while it works"
    assert demo.finish() == 0, demo.output()
    out = demo.output()

    assert not running(config), out  # Orthanc stopped, nothing left behind
    assert "OK: 3 of 3 chest X-ray studies done" in out
    assert re.search(r"dx-two-views +image 2/2 +classify", out), out
    assert "reason: not a chest X-ray" in out
    for key in ("input/original/", "input/dicom/", "segmentation/masks/", "report/report.json"):
        assert key in out

    db = sqlite3.connect(workdir / "cxrd.db")
    try:
        states = Counter(state for (state,) in db.execute("SELECT state FROM studies"))
        sizes = Counter(db.execute("SELECT width, height FROM instances"))
    finally:
        db.close()
    assert states == {"done": 3, "skipped": 1}
    assert sum(sizes.values()) == 4  # PA + LL, CR, JPEG

    overlays = sorted((workdir / "overlays").glob("*.png"))
    assert len(overlays) == 4, out
    seen: Counter[tuple[int, int]] = Counter()
    for path in overlays:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            seen[image.size] += 1
            colours = {colour for _count, colour in image.getcolors(1 << 20) or []}
        assert {colour for _name, colour in LABELS.values()} <= colours, path.name
        assert BOX_COLOUR in colours, path.name
    assert seen == sizes  # the rendering's own size, as the models saw it (<= max_side)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_demo_stops_everything_and_removes_its_files(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGINT/SIGTERM while the daemon works: exit 128+signal, Orthanc gone, temp dir removed."""
    demo = Demo(env={**os.environ, "TMPDIR": str(tmp_path)})
    config = orthanc_config(demo)
    demo.wait_for("daemon started")
    assert running(config)
    demo.proc.send_signal(signum)
    assert demo.finish(timeout=60) == 128 + signum, demo.output()
    assert f"{signum.name}: stopped the daemon" in demo.output()
    assert not running(config), demo.output()
    assert not Path(config).exists()
    assert list(tmp_path.iterdir()) == [], "the demo's temporary directory should be gone"


def test_timeout_says_what_is_unfinished_keeps_the_files_and_exits_1(tmp_path: Path) -> None:
    """Studies unfinished at --timeout: exit 1 naming them, files kept, nothing left running."""
    workdir = tmp_path / "demo"
    demo = Demo("--workdir", str(workdir), "--timeout", "1")  # StableAge alone is 2 s
    config = orthanc_config(demo)
    assert demo.finish() == 1, demo.output()
    assert "timed out after 1 s; unfinished: dx-two-views (" in demo.output()
    assert "NOT OK: 0 of 3 chest X-ray studies done" in demo.output()
    assert not running(config)
    assert (workdir / "cxrd.log").is_file()
