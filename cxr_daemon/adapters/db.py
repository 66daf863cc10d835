"""The ``Store`` port on MySQL/MariaDB (pymysql) and on SQLite (stdlib).

One class, one set of SQL statements: the dialects differ only in the
placeholder, the DDL fragments of ``db_schema`` and how a claim locks
(``FOR UPDATE SKIP LOCKED`` on MySQL, one writer at a time on SQLite).
Timestamps are naive UTC, written as ``YYYY-MM-DD HH:MM:SS.ffffff``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from cxr_daemon.adapters.db_schema import MIGRATIONS, SCHEMA_VERSION
from cxr_daemon.adapters.sql import Connector, connector_for
from cxr_daemon.domain import QueuedStudy, RunOutcome, StudyRef, StudyState, Trigger, utcnow
from cxr_daemon.errors import ConfigError
from cxr_daemon.ports import RunResults, RunRow, RunVersions, StudyRow

TERMINAL = (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED)
POISON_FACTOR = 3  # interruptions tolerated per study, as a multiple of max_attempts


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _dt(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value  # type: ignore[no-any-return]


class SqlStore:
    """The database behind the queue, checkpoint and run records."""

    def __init__(self, url: str, password: str = "", connector: Connector | None = None) -> None:
        self.db = connector or connector_for(url, password)

    # -- schema -------------------------------------------------------------

    def schema_version(self) -> int:
        """Version recorded in the database; 0 when the schema was never created."""
        with self.db.transaction() as cur:
            if not self.db.table_exists(cur, "schema_version"):
                return 0
            cur.execute("SELECT MAX(version) FROM schema_version")
            row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def migrate(self) -> tuple[int, int]:
        """Apply every migration above the recorded version; return (before, after)."""
        before = self.schema_version()
        if before > SCHEMA_VERSION:
            raise ConfigError(
                f"database schema is version {before}, newer than this cxrd "
                f"({SCHEMA_VERSION}): upgrade cxrd"
            )
        for version in range(before + 1, SCHEMA_VERSION + 1):
            with self.db.transaction() as cur:
                for statement in MIGRATIONS[version]:
                    cur.execute(self.db.ddl(statement))
                cur.execute(self.db.sql("DELETE FROM schema_version"))
                cur.execute(
                    self.db.sql("INSERT INTO schema_version (version) VALUES (?)"), (version,)
                )
        return before, SCHEMA_VERSION

    def require_current_schema(self) -> None:
        """Raise ConfigError unless the schema is exactly this cxrd's version."""
        version = self.schema_version()
        if version < SCHEMA_VERSION:
            raise ConfigError(
                f"database schema is version {version}, this cxrd needs {SCHEMA_VERSION}: "
                "run `cxrd db migrate`"
            )
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"database schema is version {version}, newer than this cxrd "
                f"({SCHEMA_VERSION}): upgrade cxrd"
            )

    # -- feed ---------------------------------------------------------------

    def checkpoint(self) -> int | None:
        """The last /changes seq whose page is fully recorded, or None on first start."""
        row = self._one("SELECT seq FROM checkpoint WHERE id = 1")
        return int(row[0]) if row else None

    def record_feed_page(
        self, stable: Sequence[StudyRef], waiting: Sequence[StudyRef], checkpoint: int
    ) -> None:
        """Queue the page's studies and move the checkpoint, in one transaction."""
        now = _ts(utcnow())
        with self.db.transaction() as cur:
            for ref in waiting:
                self._wait(cur, ref, now)
            for ref in stable:
                self._queue(cur, ref, now)
            cur.execute(self.db.sql("DELETE FROM checkpoint WHERE id = 1"))
            cur.execute(
                self.db.sql("INSERT INTO checkpoint (id, seq, updated_at) VALUES (1, ?, ?)"),
                (checkpoint, now),
            )

    def _insert_study(self, cur: Any, ref: StudyRef, state: StudyState, now: str) -> bool:
        cur.execute(
            self.db.sql(
                f"{self.db.insert_ignore} INTO studies (study_uid, orthanc_id, state, attempts, "
                "first_seen_at, queued_at, updated_at) VALUES (?, ?, ?, 0, ?, ?, ?)"
            ),
            (ref.study_uid, ref.orthanc_id, state.value, now, now, now),
        )
        return bool(cur.rowcount)

    def _wait(self, cur: Any, ref: StudyRef, now: str) -> None:
        """Note a NewStudy: a new row waits; so does a finished one (deleted and sent again).

        A queued or running study is left alone: its StableStudy (or the
        stability check) queues it again. ``queued_at`` of a waiting row is
        when it started waiting, which the stability check measures from.
        """
        if self._insert_study(cur, ref, StudyState.WAITING, now):
            return
        cur.execute(
            self.db.sql(
                "UPDATE studies SET state = 'waiting', orthanc_id = ?, attempts = 0, "
                "next_attempt_at = NULL, queued_at = ?, updated_at = ? "
                "WHERE study_uid = ? AND state IN ('done', 'skipped', 'failed')"
            ),
            (ref.orthanc_id, now, now, ref.study_uid),
        )

    def _queue(self, cur: Any, ref: StudyRef, now: str) -> None:
        """Make ``ref`` pending; a running study is flagged to run again afterwards."""
        if self._insert_study(cur, ref, StudyState.PENDING, now):
            return
        cur.execute(
            self.db.sql(f"SELECT state FROM studies WHERE study_uid = ? {self.db.for_update}"),
            (ref.study_uid,),
        )
        state = StudyState(cur.fetchone()[0])
        if state is StudyState.RUNNING:
            sql = "UPDATE studies SET requeued = 1, orthanc_id = ? WHERE study_uid = ?"
            cur.execute(self.db.sql(sql), (ref.orthanc_id, ref.study_uid))
        elif state is not StudyState.PENDING:
            cur.execute(
                self.db.sql(
                    "UPDATE studies SET state = 'pending', attempts = 0, next_attempt_at = NULL, "
                    "orthanc_id = ?, queued_at = ?, updated_at = ? WHERE study_uid = ?"
                ),
                (ref.orthanc_id, now, now, ref.study_uid),
            )

    def queue_studies(self, refs: Sequence[StudyRef]) -> None:
        """Make each study pending as a StableStudy would (backfill); the checkpoint stays."""
        now = _ts(utcnow())
        with self.db.transaction(write=True) as cur:
            for ref in refs:
                self._queue(cur, ref, now)

    # -- waiting (NewStudy seen, no StableStudy yet) --------------------------

    def waiting_older_than(self, cutoff: datetime, limit: int) -> list[StudyRef]:
        """Studies waiting since before ``cutoff``, oldest first (index on state, queued_at)."""
        rows = self._all(
            "SELECT study_uid, orthanc_id FROM studies WHERE state = 'waiting' "
            "AND queued_at <= ? ORDER BY queued_at LIMIT ?",
            (_ts(cutoff), limit),
        )
        return [StudyRef(study_uid=r[0], orthanc_id=r[1]) for r in rows]

    def promote_waiting(self, study_uid: str) -> bool:
        """Waiting -> pending, keeping its place in line (``queued_at``); False if not waiting."""
        return self._update(
            "UPDATE studies SET state = 'pending', attempts = 0, next_attempt_at = NULL, "
            "updated_at = ? WHERE study_uid = ? AND state = 'waiting'",
            (_ts(utcnow()), study_uid),
        )

    def skip_waiting(self, study_uid: str, reason: str) -> bool:
        """Waiting -> skipped with ``reason``; False if it is no longer waiting."""
        return self._update(
            "UPDATE studies SET state = 'skipped', last_error = ?, updated_at = ? "
            "WHERE study_uid = ? AND state = 'waiting'",
            (reason, _ts(utcnow()), study_uid),
        )

    def oldest_waiting(self) -> datetime | None:
        """Since when the longest-waiting study has waited, or None."""
        row = self._one("SELECT MIN(queued_at) FROM studies WHERE state = 'waiting'")
        return _dt(row[0]) if row else None

    # -- queue --------------------------------------------------------------

    def reclaim_running(self, max_attempts: int) -> int:
        """Hand back rows a dead process left ``running``; return how many went back.

        A kill from outside (OOM killer, reboot, SIGKILL) is not the study's
        fault, so the interrupted attempt is not counted and the study goes to
        the back of the queue, letting the others through. A study whose runs
        were interrupted ``3 * max_attempts`` times is taken to be what kills
        the process and is failed, so one poison study cannot crash-loop the
        service for ever.
        """
        now = _ts(utcnow())
        limit = POISON_FACTOR * max_attempts
        with self.db.transaction(write=True) as cur:
            cur.execute(
                self.db.sql(
                    "UPDATE runs SET outcome = 'interrupted', finished_at = ?, "
                    "reason = 'process stopped before the run finished' WHERE outcome = 'running'"
                ),
                (now,),
            )
            cur.execute(
                "SELECT s.study_uid, (SELECT COUNT(*) FROM runs r WHERE r.study_uid = s.study_uid "
                "AND r.outcome = 'interrupted') FROM studies s WHERE s.state = 'running'"
            )
            running = list(cur.fetchall())
            for study_uid, interruptions in running:
                if int(interruptions) >= limit:
                    sql = (
                        "UPDATE studies SET state = 'failed', updated_at = ?, last_error = ? "
                        "WHERE study_uid = ?"
                    )
                    reason = f"the process died {interruptions} times while processing this study"
                    cur.execute(self.db.sql(sql), (now, reason, study_uid))
                else:
                    sql = (
                        "UPDATE studies SET state = 'pending', attempts = CASE WHEN attempts > 0 "
                        "THEN attempts - 1 ELSE 0 END, queued_at = ?, updated_at = ? "
                        "WHERE study_uid = ?"
                    )
                    cur.execute(self.db.sql(sql), (now, now, study_uid))
        return sum(1 for _, n in running if int(n) < limit)

    def claim(self, now: datetime) -> QueuedStudy | None:
        """Take the oldest due pending study, mark it running and count an attempt."""
        with self.db.transaction(write=True) as cur:
            cur.execute(
                self.db.sql(
                    "SELECT study_uid, orthanc_id, attempts FROM studies WHERE state = 'pending' "
                    "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                    f"ORDER BY queued_at LIMIT 1 {self.db.for_update_skip_locked}"
                ),
                (_ts(now),),
            )
            row = cur.fetchone()
            if row is None:
                return None
            self._mark_running(cur, row[0])
        return QueuedStudy(study_uid=row[0], orthanc_id=row[1], attempts=int(row[2]) + 1)

    def claim_study(self, ref: StudyRef) -> QueuedStudy:
        """Queue ``ref`` if needed and mark it running now, whatever its state."""
        now = _ts(utcnow())
        with self.db.transaction(write=True) as cur:
            self._insert_study(cur, ref, StudyState.PENDING, now)
            cur.execute(
                self.db.sql(
                    "UPDATE studies SET orthanc_id = ?, attempts = 0, requeued = 0 "
                    "WHERE study_uid = ?"
                ),
                (ref.orthanc_id, ref.study_uid),
            )
            self._mark_running(cur, ref.study_uid)
        return QueuedStudy(study_uid=ref.study_uid, orthanc_id=ref.orthanc_id, attempts=1)

    def _mark_running(self, cur: Any, study_uid: str) -> None:
        cur.execute(
            self.db.sql(
                "UPDATE studies SET state = 'running', attempts = attempts + 1, "
                "updated_at = ? WHERE study_uid = ?"
            ),
            (_ts(utcnow()), study_uid),
        )

    def finish_study(
        self,
        study_uid: str,
        state: StudyState,
        reason: str = "",
        next_attempt_at: datetime | None = None,
    ) -> StudyState:
        """Leave running for ``state``; a study re-announced meanwhile goes back to pending."""
        now = _ts(utcnow())
        with self.db.transaction(write=True) as cur:
            cur.execute(
                self.db.sql(
                    f"SELECT requeued FROM studies WHERE study_uid = ? {self.db.for_update}"
                ),
                (study_uid,),
            )
            row = cur.fetchone()
            requeued = bool(row and row[0])
            if requeued and state in TERMINAL:
                state, next_attempt_at = StudyState.PENDING, None
                attempts_sql = "attempts = 0, queued_at = ?,"
                args: tuple[Any, ...] = (now,)
            else:
                attempts_sql, args = "", ()
            cur.execute(
                self.db.sql(
                    f"UPDATE studies SET state = ?, {attempts_sql} last_error = ?, "
                    "next_attempt_at = ?, requeued = 0, updated_at = ? WHERE study_uid = ?"
                ),
                (
                    state.value,
                    *args,
                    reason or None,
                    _ts(next_attempt_at) if next_attempt_at else None,
                    now,
                    study_uid,
                ),
            )
        return state

    def release(self, study_uid: str) -> None:
        """Hand a claimed study back to pending without counting the attempt."""
        self._exec(
            "UPDATE studies SET state = 'pending', attempts = attempts - 1, updated_at = ? "
            "WHERE study_uid = ? AND state = 'running'",
            (_ts(utcnow()), study_uid),
        )

    # -- runs ---------------------------------------------------------------

    def interrupt_runs(self, study_uid: str) -> bool:
        """Close the study's runs left running (an outage cut them short) as interrupted."""
        return self._update(
            "UPDATE runs SET outcome = 'interrupted', finished_at = ?, "
            "reason = 'the database went away before the run was recorded' "
            "WHERE study_uid = ? AND outcome = 'running'",
            (_ts(utcnow()), study_uid),
        )

    def last_done_hash(self, study_uid: str) -> str | None:
        """Instance-set hash of the study's most recent done run."""
        row = self._one(
            "SELECT instance_set_hash FROM runs WHERE study_uid = ? AND outcome = 'done' "
            "ORDER BY started_at DESC LIMIT 1",
            (study_uid,),
        )
        return str(row[0]) if row and row[0] else None

    def start_run(self, study_uid: str, trigger: Trigger, versions: RunVersions) -> str:
        """Record a new running run; return its id."""
        run_id = uuid.uuid4().hex
        self._exec(
            "INSERT INTO runs (run_id, study_uid, trigger_kind, outcome, started_at, "
            "code_version, model_versions, prompt_hash) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
            (
                run_id,
                study_uid,
                trigger.value,
                _ts(utcnow()),
                versions.code,
                versions.models,
                versions.prompt_hash,
            ),
        )
        return run_id

    def finish_run(
        self, run_id: str, outcome: RunOutcome, reason: str = "", results: RunResults | None = None
    ) -> None:
        """Close the run and save its results in the same transaction."""
        res = results or RunResults()
        with self.db.transaction(write=True) as cur:
            cur.execute(
                self.db.sql(
                    "UPDATE runs SET outcome = ?, reason = ?, finished_at = ?, "
                    "instance_set_hash = ?, log_key = ?, "
                    "model_versions = CASE WHEN ? = '' THEN model_versions ELSE ? END "
                    "WHERE run_id = ?"
                ),
                (
                    outcome.value,
                    reason or None,
                    _ts(utcnow()),
                    res.instance_set_hash or None,
                    res.log_key or None,
                    res.models,
                    res.models,
                    run_id,
                ),
            )
            self._save_results(cur, run_id, res)

    def _save_results(self, cur: Any, run_id: str, res: RunResults) -> None:
        for i in res.instances:
            cur.execute(
                self.db.sql(
                    "INSERT INTO instances (run_id, sop_uid, series_uid, view_position, rendering, "
                    "width, height, jpg_key, dcm_key, mask_key) VALUES (?,?,?,?,?,?,?,?,?,?)"
                ),
                (
                    run_id,
                    i.sop_uid,
                    i.series_uid,
                    i.view,
                    i.rendering,
                    i.width,
                    i.height,
                    i.jpg_key,
                    i.dcm_key,
                    i.mask_key,
                ),
            )
        for f in res.findings:
            cur.execute(
                self.db.sql(
                    "INSERT INTO findings (run_id, sop_uid, label, probability, bbox) "
                    "VALUES (?, ?, ?, ?, ?)"
                ),
                (
                    run_id,
                    f.sop_uid,
                    f.label,
                    f.probability,
                    json.dumps(list(f.bbox)) if f.bbox else None,
                ),
            )
        if (r := res.report) is not None:
            cur.execute(
                self.db.sql(
                    "INSERT INTO reports (run_id, report_text, model_id, input_tokens, "
                    "output_tokens, stop_reason, prompt_hash) VALUES (?, ?, ?, ?, ?, ?, ?)"
                ),
                (
                    run_id,
                    r.text,
                    r.model_id,
                    r.input_tokens,
                    r.output_tokens,
                    r.stop_reason,
                    r.prompt_hash,
                ),
            )
        if res.patient_id:
            cur.execute(
                self.db.sql(
                    "UPDATE studies SET patient_id = ? WHERE study_uid = "
                    "(SELECT study_uid FROM runs WHERE run_id = ?)"
                )
                if self.db.dialect == "sqlite"
                else self.db.sql(
                    "UPDATE studies s JOIN runs r ON r.study_uid = s.study_uid "
                    "SET s.patient_id = ? WHERE r.run_id = ?"
                ),
                (res.patient_id, run_id),
            )

    # -- status -------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Studies per state, every state present."""
        counts = {s.value: 0 for s in StudyState}
        for state, n in self._all("SELECT state, COUNT(*) FROM studies GROUP BY state"):
            counts[state] = int(n)
        return counts

    def failures(self, limit: int) -> list[StudyRow]:
        """The most recent failed studies."""
        rows = self._all(
            f"SELECT {self._STUDY_COLS} FROM studies WHERE state = 'failed' "
            "ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
        return [self._study(r) for r in rows]

    def study_row(self, study_uid: str) -> StudyRow | None:
        """One queue row, or None."""
        row = self._one(f"SELECT {self._STUDY_COLS} FROM studies WHERE study_uid = ?", (study_uid,))
        return self._study(row) if row else None

    def runs(self, study_uid: str) -> list[RunRow]:
        """The study's runs, oldest first."""
        rows = self._all(
            "SELECT run_id, trigger_kind, outcome, reason, started_at, finished_at FROM runs "
            "WHERE study_uid = ? ORDER BY started_at, run_id",
            (study_uid,),
        )
        return [
            RunRow(r[0], r[1], r[2], r[3] or "", _dt(r[4]) or utcnow(), _dt(r[5])) for r in rows
        ]

    _STUDY_COLS = "study_uid, orthanc_id, state, attempts, last_error, updated_at"

    @staticmethod
    def _study(r: Sequence[Any]) -> StudyRow:
        return StudyRow(r[0], r[1], StudyState(r[2]), int(r[3]), r[4] or "", _dt(r[5]))

    def ping(self) -> str:
        """Reach the database and check the schema."""
        self.require_current_schema()
        return f"{self.db.describe()}, schema v{SCHEMA_VERSION}"

    def close(self) -> None:
        """Close every connection."""
        self.db.close()

    # -- helpers ------------------------------------------------------------

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> None:
        with self.db.transaction(write=True) as cur:
            cur.execute(self.db.sql(sql), tuple(args))

    def _update(self, sql: str, args: Sequence[Any] = ()) -> bool:
        """Run one UPDATE; True when it changed a row."""
        with self.db.transaction(write=True) as cur:
            cur.execute(self.db.sql(sql), tuple(args))
            return bool(cur.rowcount)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Sequence[Any] | None:
        with self.db.transaction() as cur:
            cur.execute(self.db.sql(sql), tuple(args))
            row: Sequence[Any] | None = cur.fetchone()
        return row

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        with self.db.transaction() as cur:
            cur.execute(self.db.sql(sql), tuple(args))
            return list(cur.fetchall())

    @contextmanager
    def raw(self) -> Iterator[Any]:
        """A cursor in a transaction, for tests and reports that need plain SQL."""
        with self.db.transaction() as cur:
            yield cur
