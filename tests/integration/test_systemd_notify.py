"""`cxrd run` speaks systemd's notify protocol to a real socket, as under `Type=notify`."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cxr_daemon.modelserver import ModelServer
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.integration

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
WATCHDOG_S = 2.0
MODEL_LATENCY_S = 1.2  # per model call; two images in turn: a study outlasts the watchdog


class SystemdStandIn:
    """The manager's side of the notify socket: every datagram, stamped as it arrives."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed
                return
            with self.changed:
                self.messages.append((time.monotonic(), data.decode()))
                self.changed.notify_all()

    def wait_for(self, message: str, timeout: float) -> None:
        """Block until a datagram starting with ``message`` has arrived."""
        with self.changed:
            if not self.changed.wait_for(
                lambda: any(m.startswith(message) for _, m in self.messages), timeout
            ):
                raise TimeoutError(f"no {message!r} in {timeout} s: {self.messages}")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(5)


@pytest.fixture
def systemd() -> Iterator[SystemdStandIn]:
    """A bound datagram socket standing in for systemd's /run/systemd/notify."""
    # A short directory: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="cxrd-") as directory:
        stand_in = SystemdStandIn(str(Path(directory) / "notify"))
        try:
            yield stand_in
        finally:
            stand_in.close()


def test_ready_watchdog_through_a_study_then_stopping(
    systemd: SystemdStandIn,
    orthanc: OrthancProcess,
    tmp_path: Path,
    make_config: Callable[..., Path],
) -> None:
    """READY=1 after start-up, WATCHDOG=1 never further apart than a 2 s watchdog allows,
    even while a study's two model calls take 2.4 s, then STOPPING=1 on SIGTERM and exit 0."""
    with ModelServer(latency_ms=MODEL_LATENCY_S * 1000) as model:
        config = make_config(model_url=model.url)
        env = {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
        daemon = DaemonProcess(config, env=env)
        try:
            systemd.wait_for("READY=1", timeout=60)
            systemd.wait_for("WATCHDOG=1", timeout=10)
            uid = str(new_uid())
            views = [
                write_chest_phantom(tmp_path / f"{view}.dcm", study_uid=uid, view_position=view,
                                    rows=256, cols=256)
                for view in ("PA", "LL")
            ]  # fmt: skip
            send_files(views, host="127.0.0.1", port=orthanc.dicom_port)
            wait_until_stable(orthanc.url, orthanc.auth, [uid], timeout_s=60)
            finished = json.loads(daemon.wait_for_log('"study_finished"', timeout=120))
            assert finished["state"] == "done", daemon.output()
            assert finished["duration_s"] >= 2 * MODEL_LATENCY_S
            daemon.proc.send_signal(signal.SIGTERM)
            systemd.wait_for("STOPPING=1", timeout=60)
            assert daemon.proc.wait(60) == 0, daemon.output()
        finally:
            daemon.stop()

    messages = [m for _, m in systemd.messages]
    assert messages[0] == "READY=1\nSTATUS=checkpoint 0"
    assert set(messages[1:-1]) == {"WATCHDOG=1"}
    assert messages[-1] == "STOPPING=1"
    pings = [at for at, m in systemd.messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_S, f"longest silence {max(gaps):.2f} s"


def test_unit_file_verifies_and_rates_at_most_2_0() -> None:
    """systemd/cxrd.service: `systemd-analyze verify` prints nothing, `security` rates it <= 2.0."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    done = subprocess.run(
        [str(UNIT_DIR / "check-unit")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rating = re.search(r"Overall exposure level for cxrd.service: ([0-9.]+)", done.stdout)
    assert rating is not None, done.stdout
    assert float(rating.group(1)) <= 2.0
