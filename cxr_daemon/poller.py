"""The change feed: ``/changes`` pages -> queue rows + checkpoint, one transaction a page."""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from cxr_daemon.domain import Change, ChangeType, StudyRef
from cxr_daemon.errors import InvalidUidError, SkipStudyError
from cxr_daemon.ports import Metrics, NullMetrics, Orthanc, Store

log = structlog.get_logger(__name__)


class Poller:
    """Reads the feed from the stored checkpoint and queues the studies it announces."""

    def __init__(
        self,
        orthanc: Orthanc,
        store: Store,
        page_size: int,
        start_from: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.orthanc = orthanc
        self.store = store
        self.page_size = page_size
        self.start_from = start_from
        self.metrics = metrics or NullMetrics()

    def prime(self) -> int:
        """On first start, set the checkpoint per ``orthanc.start_from``; return it."""
        checkpoint = self.store.checkpoint()
        if checkpoint is not None:
            return checkpoint
        checkpoint = self.orthanc.last_change() if self.start_from == "now" else 0
        self.store.record_feed_page([], [], checkpoint)
        log.info("checkpoint_initialised", checkpoint=checkpoint, start_from=self.start_from)
        return checkpoint

    def step(self) -> bool:
        """Read and record one page; return True when more pages are waiting.

        Raises:
            TransientError, PermanentError, ConfigError: from Orthanc or the
            database; nothing is recorded and the same page is read next time.
        """
        since = self.store.checkpoint() or 0
        page = self.orthanc.changes(since, self.page_size)
        if page.last < since:
            # Orthanc's index was replaced (new database, restored backup): its
            # sequence restarted. Re-read everything; idempotency skips what
            # was already done.
            log.error("orthanc_feed_rewound", checkpoint=since, orthanc_last=page.last)
            self.store.record_feed_page([], [], 0)
            return True
        stable = self._refs(c for c in page.changes if c.change_type == ChangeType.STABLE_STUDY)
        waiting = self._refs(c for c in page.changes if c.change_type == ChangeType.NEW_STUDY)
        self.store.record_feed_page(stable, waiting, page.last)
        self.metrics.poll_succeeded()
        if page.changes:
            log.info(
                "feed_page_recorded",
                since=since,
                checkpoint=page.last,
                changes=len(page.changes),
                stable=len(stable),
                new=len(waiting),
            )
        return not page.done

    def _refs(self, changes: Iterable[Change]) -> list[StudyRef]:
        """Resolve each change's study to its StudyInstanceUID, once per study."""
        refs: dict[str, StudyRef] = {}
        for change in changes:
            try:
                uid = self.orthanc.study_uid(change.orthanc_id)
            except SkipStudyError:
                log.info("study_gone_before_queued", orthanc_id=change.orthanc_id, seq=change.seq)
                continue
            except InvalidUidError as exc:
                # Cannot be a queue key nor an S3 key; a page must not stall on it.
                log.error(  # noqa: TRY400 - the reason is the message, no traceback wanted
                    "study_rejected", orthanc_id=change.orthanc_id, reason=str(exc)
                )
                continue
            refs[uid] = StudyRef(study_uid=uid, orthanc_id=change.orthanc_id)
        return list(refs.values())
