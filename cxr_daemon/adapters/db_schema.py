"""Versioned schema of the cxrd database, one DDL text for MySQL/MariaDB and SQLite.

Each migration is a list of statements; ``{pk_auto}`` and ``{table_opts}`` are
the only dialect differences. A migration is applied in one pass and the
version row is bumped after it, so ``cxrd db migrate`` is idempotent: it only
applies versions above the one recorded.

Column names avoid words reserved in MySQL (``trigger``, ``view``).
"""

from __future__ import annotations

V1 = [
    """CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL
    ) {table_opts}""",
    """CREATE TABLE IF NOT EXISTS checkpoint (
        id INTEGER NOT NULL PRIMARY KEY,
        seq BIGINT NOT NULL,
        updated_at DATETIME(6) NOT NULL
    ) {table_opts}""",
    """CREATE TABLE IF NOT EXISTS studies (
        study_uid VARCHAR(64) NOT NULL PRIMARY KEY,
        orthanc_id VARCHAR(64) NOT NULL,
        state VARCHAR(16) NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DATETIME(6) NULL,
        last_error TEXT NULL,
        requeued INTEGER NOT NULL DEFAULT 0,
        patient_id VARCHAR(64) NULL,
        first_seen_at DATETIME(6) NOT NULL,
        queued_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL
    ) {table_opts}""",
    "CREATE INDEX idx_studies_claim ON studies (state, queued_at)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id CHAR(32) NOT NULL PRIMARY KEY,
        study_uid VARCHAR(64) NOT NULL,
        trigger_kind VARCHAR(16) NOT NULL,
        outcome VARCHAR(16) NOT NULL,
        reason TEXT NULL,
        started_at DATETIME(6) NOT NULL,
        finished_at DATETIME(6) NULL,
        instance_set_hash CHAR(64) NULL,
        code_version VARCHAR(64) NOT NULL,
        model_versions VARCHAR(255) NOT NULL,
        prompt_hash VARCHAR(64) NOT NULL,
        log_key VARCHAR(255) NULL
    ) {table_opts}""",
    "CREATE INDEX idx_runs_study ON runs (study_uid, started_at)",
    """CREATE TABLE IF NOT EXISTS instances (
        run_id CHAR(32) NOT NULL,
        sop_uid VARCHAR(64) NOT NULL,
        series_uid VARCHAR(64) NOT NULL,
        view_position VARCHAR(16) NOT NULL,
        rendering VARCHAR(16) NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        jpg_key VARCHAR(255) NOT NULL,
        dcm_key VARCHAR(255) NOT NULL,
        mask_key VARCHAR(255) NOT NULL,
        PRIMARY KEY (run_id, sop_uid)
    ) {table_opts}""",
    """CREATE TABLE IF NOT EXISTS findings (
        id {pk_auto},
        run_id CHAR(32) NOT NULL,
        sop_uid VARCHAR(64) NOT NULL,
        label VARCHAR(64) NOT NULL,
        probability DOUBLE NOT NULL,
        bbox VARCHAR(64) NULL
    ) {table_opts}""",
    "CREATE INDEX idx_findings_run ON findings (run_id)",
    """CREATE TABLE IF NOT EXISTS reports (
        run_id CHAR(32) NOT NULL PRIMARY KEY,
        report_text TEXT NOT NULL,
        model_id VARCHAR(255) NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        stop_reason VARCHAR(32) NOT NULL,
        prompt_hash VARCHAR(64) NOT NULL
    ) {table_opts}""",
]

MIGRATIONS: dict[int, list[str]] = {1: V1}
SCHEMA_VERSION = max(MIGRATIONS)
