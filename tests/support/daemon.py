"""Run the real `cxrd` command in a subprocess, as systemd or an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from cxr_daemon.sandbox.orthanc import OrthancProcess

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CXRD = [sys.executable, "-c", "from cxr_daemon.cli import app; app()"]


def write_config(
    path: Path,
    orthanc: OrthancProcess,
    database_url: str,
    *,
    s3_endpoint: str = "http://127.0.0.1:9",
    bucket: str = "cxrd-test",
    model_url: str = "http://127.0.0.1:9",
    poll_interval_s: float = 0.2,
    extra: str = "",
) -> Path:
    """A config for a test daemon: the private Orthanc, the given DB, history from seq 0."""
    user, password = orthanc.auth
    path.write_text(
        f"""
[orthanc]
url = "{orthanc.url}"
username = "{user}"
password = "{password}"
poll_interval_s = {poll_interval_s}
page_size = 4
start_from = "beginning"
timeout_s = 10

[s3]
bucket = "{bucket}"
prefix = "test"
region = "us-east-1"
endpoint_url = "{s3_endpoint}"

[inference]
backend = "http"
segmentation_endpoint = "{model_url}/segmentation"
classification_endpoint = "{model_url}/classification"
max_side = 512
timeout_s = 30

[report]
backend = "template"

[database]
url = "{database_url}"

[pipeline]
retry_backoff_s = [0.5, 1]

[log]
format = "json"
level = "info"
{extra}
"""
    )
    return path


def cxrd(
    *args: str, config: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `cxrd <args> --config <config>` to completion."""
    return subprocess.run(
        [*CXRD, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **AWS_TEST_ENV, **(env or {})},
        check=False,
    )


class DaemonProcess:
    """`cxrd run` in the background, its stderr (JSON log lines) collected as it goes."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*CXRD, "run", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **AWS_TEST_ENV, **(env or {})},
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for_log(self, text: str, timeout: float = 60) -> str:
        """Block until a log line containing `text` appears; return it."""

        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self.changed:
            if not self.changed.wait_for(
                lambda: found() is not None or self.proc.poll() is not None, timeout
            ):
                raise TimeoutError(f"no log line with {text!r} in {timeout} s:\n{self.output()}")
            line = found()
        if line is None:
            raise RuntimeError(
                f"cxrd exited {self.proc.returncode} before {text!r}:\n{self.output()}"
            )
        return line

    def wait_for_lines(self, count: int, timeout: float = 60) -> None:
        """Block until ``count`` log lines were written or the process ended."""
        with self.changed:
            if not self.changed.wait_for(
                lambda: len(self.lines) >= count or self.proc.poll() is not None, timeout
            ):
                raise TimeoutError(f"fewer than {count} log lines in {timeout} s")

    def output(self) -> str:
        """Everything logged so far."""
        with self.changed:
            return "".join(self.lines[-200:])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM if still running, then wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code


def held_daemon(config: Path, workdir: Path, step: str = "record") -> tuple[DaemonProcess, Path]:
    """`cxrd run` holding its first study at ``step``; returns it and the file that holds it.

    Removing the returned file lets the study go on (see cxr_daemon/adapters/gate.py).
    """
    gate = workdir / "gate"
    gate.mkdir()
    block = gate / f"block-{step}"
    block.touch()
    daemon = DaemonProcess(config, env={"CXRD_TEST_GATE_DIR": str(gate)})
    daemon.wait_for_log("test_gate_holding")
    return daemon, block
