"""`cxrd run` with `[metrics] enabled`: /metrics scraped while it runs on the real sandbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import tenacity
from prometheus_client.parser import text_string_to_metric_families

from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom
from cxr_daemon.sandbox.processes import free_loopback_ports
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """GET /metrics; every sample by (name, labels)."""
    answer = requests.get(url, timeout=10)
    answer.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_until(url: str, ready: Callable[[Samples], bool], timeout_s: float = 60) -> Samples:
    """Scrape until ``ready`` holds (bounded); return that scrape."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
        retry=tenacity.retry_if_result(lambda s: not ready(s))
        | tenacity.retry_if_exception_type(requests.ConnectionError),
        reraise=True,
    )
    return retrying(lambda: scrape(url))


def test_metrics_move_as_the_daemon_works(
    orthanc: OrthancProcess,
    tmp_path: Path,
    make_config: Callable[..., Path],
) -> None:
    """Polls stamp the last-poll time; a C-STOREd CXR moves the finished counter, step
    histograms and queue gauges; with Orthanc down the scrape still answers, marking it down."""
    (port,) = free_loopback_ports(1)
    config = make_config(extra=f'\n[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n')
    url = f"http://127.0.0.1:{port}/metrics"
    poll = "cxrd_last_successful_poll_timestamp_seconds"
    finished = "cxrd_studies_finished_total"
    steps = "cxrd_step_duration_seconds_count"
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for_log("metrics_listening")
        before = scrape_until(url, lambda s: (sample(s, poll) or 0) > 0)
        assert sample(before, finished, state="done") == 0
        assert sample(before, steps, step="download", adapter="orthanc") is None
        assert sample(before, "cxrd_queue_studies", state="done") == 0
        assert sample(before, "cxrd_scrape_source_up", source="orthanc") == 1

        uid = str(new_uid())
        dicom = write_chest_phantom(tmp_path / "one.dcm", study_uid=uid, rows=256, cols=256)
        send_files([dicom], host="127.0.0.1", port=orthanc.dicom_port)
        wait_until_stable(orthanc.url, orthanc.auth, [uid], timeout_s=60)
        daemon.wait_for_log('"study_finished"', timeout=120)

        after = scrape_until(url, lambda s: sample(s, "cxrd_feed_lag_changes") == 0)
        assert sample(after, finished, state="done") == 1
        assert sample(after, "cxrd_queue_studies", state="done") == 1
        assert sample(after, "cxrd_queue_studies", state="pending") == 0
        for step, adapter in (("download", "orthanc"), ("segment", "http"), ("report", "template")):
            assert sample(after, steps, step=step, adapter=adapter) == 1, step
        assert (sample(after, poll) or 0) > (sample(before, poll) or 0)
        assert sample(after, "cxrd_orthanc_last_change") == sample(after, "cxrd_feed_checkpoint")
        assert (sample(after, "cxrd_orthanc_last_change") or 0) > 0
        assert (sample(after, "process_resident_memory_bytes") or 0) > 0

        orthanc.stop()
        down = scrape(url)
        assert sample(down, "cxrd_scrape_source_up", source="orthanc") == 0
        assert sample(down, "cxrd_feed_lag_changes") is None
        assert sample(down, "cxrd_queue_studies", state="done") == 1
    finally:
        assert daemon.stop() == 0, daemon.output()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
