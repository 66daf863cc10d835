"""Crash safety: SIGKILL the daemon at many random moments; every study ends done once."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyLayout
from cxr_daemon.modelserver import ModelServer
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom
from tests.support.daemon import DaemonProcess, cxrd

pytestmark = pytest.mark.integration
STUDIES = 10
KILLS = 24


def test_random_sigkills_leave_every_study_done_exactly_once(
    orthanc: OrthancProcess,
    mysql_url: str,
    s3_server: str,
    bucket: str,
    tmp_path: Path,
    make_config: Callable[..., Path],
) -> None:
    """24 SIGKILLs at random points of the daemon's log stream over 10 studies, a restart
    after each: one done run per study, no duplicate rows, every S3 object present."""
    rng = random.Random(20261204)  # a fixed seed: a failure can be replayed
    uids = [str(new_uid()) for _ in range(STUDIES)]
    files = [write_chest_phantom(tmp_path / f"s{n}.dcm", study_uid=uid, rows=256, cols=224,
                                 seed=n) for n, uid in enumerate(uids)]  # fmt: skip
    send_files(files, host="127.0.0.1", port=orthanc.dicom_port)
    wait_until_stable(orthanc.url, orthanc.auth, uids, timeout_s=60)
    # Model time stretches each study so that kills land inside the pipeline too.
    with ModelServer(latency_ms=60) as model:
        config = make_config(model_url=model.url, poll_interval_s=0.1)
        config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))
        kills = 0
        while kills < KILLS:
            daemon = DaemonProcess(config)
            daemon.wait_for_log("daemon_started")
            target = len(daemon.lines) + rng.randint(1, 40)
            daemon.wait_for_lines(target)
            if daemon.proc.poll() is not None:
                break
            daemon.proc.send_signal(signal.SIGKILL)
            assert daemon.proc.wait(30) == -signal.SIGKILL
            kills += 1
        final = cxrd("run", "--once", config=config)
        assert final.returncode == 0, final.stderr[-3000:]
    assert kills == KILLS
    _assert_each_done_once(mysql_url, s3_server, bucket, uids)


def _assert_each_done_once(mysql_url: str, s3_server: str, bucket: str, uids: list[str]) -> None:
    store = SqlStore(mysql_url)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    try:
        with store.raw() as cur:
            cur.execute("SELECT COUNT(*), COUNT(DISTINCT run_id, sop_uid) FROM instances")
            total, distinct = cur.fetchone()
            cur.execute(
                "SELECT r.study_uid, r.outcome, r.reason, s.state, "
                "(SELECT COUNT(*) FROM instances i WHERE i.run_id = r.run_id) "
                "FROM runs r JOIN studies s ON s.study_uid = r.study_uid "
                "ORDER BY r.study_uid, r.started_at"
            )
            history = "\n".join(map(str, cur.fetchall()))
            assert total == distinct == STUDIES, history
            cur.execute("SELECT COUNT(*) FROM studies")
            assert cur.fetchone()[0] == STUDIES
        for uid in uids:
            row = store.study_row(uid)
            assert row is not None
            assert row.state.value == "done", (uid, row.reason)
            outcomes = [r.outcome for r in store.runs(uid)]
            assert outcomes.count("done") == 1, outcomes
            assert set(outcomes) <= {"done", "interrupted", "failed"}
            done_run = next(r for r in store.runs(uid) if r.outcome == "done")
            layout = StudyLayout(uid)
            with store.raw() as cur:
                cur.execute(store.db.sql("SELECT jpg_key, dcm_key, mask_key FROM instances "
                                         "WHERE run_id = ?"), (done_run.run_id,))  # fmt: skip
                keys = [k for row_keys in cur.fetchall() for k in row_keys]
                cur.execute(store.db.sql("SELECT log_key FROM runs WHERE run_id = ?"),
                            (done_run.run_id,))  # fmt: skip
                keys.append(cur.fetchone()[0])
            for key in [*keys, layout.result, layout.report]:
                s3.head_object(Bucket=bucket, Key=f"test/{key}")
            result = json.loads(s3.get_object(Bucket=bucket, Key=f"test/{layout.result}")["Body"]
                                .read())  # fmt: skip
            assert result["study_uid"] == uid
    finally:
        store.close()
