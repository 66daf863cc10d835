"""Step gates: how a test holds the pipeline at a step (e.g. to SIGKILL it there).

``FileGate`` is enabled only by ``$CXRD_TEST_GATE_DIR`` (read in config.py). When
the file ``block-<step>`` exists in that directory, the pipeline writes
``at-<step>`` (carrying the study UID) and waits until ``block-<step>`` is gone.
It deliberately ignores the stop event: a held study is "the study in hand",
which a first SIGTERM lets finish and a second SIGTERM abandons.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class NoGate:
    """Production: every step proceeds at once."""

    def reached(self, step: str) -> None:
        """Proceed."""


class FileGate:
    """Hold a step while ``block-<step>`` exists in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.poll = threading.Event()  # never set: its wait() is an interruptible pause

    def reached(self, step: str) -> None:
        """Announce the step and wait while it is blocked."""
        block = self.directory / f"block-{step}"
        if not block.exists():
            return
        ctx = structlog.contextvars.get_contextvars()
        (self.directory / f"at-{step}").write_text(str(ctx.get("study_uid", "")))
        log.warning("test_gate_holding", step=step)
        while block.exists():
            self.poll.wait(0.05)
