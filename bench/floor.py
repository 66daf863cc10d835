"""The floor: the same work as cxrd's per-image path, straight-line, no orchestration.

For each instance: GET ``/instances/{id}/file`` (identity encoding) into memory,
write it to a temporary file, decode and render it once with
``cxr_daemon.imaging`` (the daemon's own code, so that the ratio measures
orchestration and nothing else), encode the JPEG and the model-input PNG, PUT
the DICOM and the JPEG to S3. No feed, no queue, no database, no models.

Usage: ``python bench/floor.py JOB.json`` where the job names the Orthanc URL and
credentials, the S3 endpoint and bucket, ``max_side`` and the instance IDs.
Prints one JSON object: seconds per step (summed over instances), instances,
bytes, and the work time (after imports).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.config import Config as BotoConfig

from cxr_daemon import encoding, imaging

STEPS = ("get", "render", "encode", "put")


def main(argv: list[str]) -> int:
    """Process every instance of the job once; print the timings as JSON."""
    job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    began = time.perf_counter()
    seconds = dict.fromkeys(STEPS, 0.0)
    size = 0
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=job["s3_url"], region_name=job["region"],
        config=BotoConfig(s3={"addressing_style": "path"}),
    )  # fmt: skip
    with requests.Session() as orthanc, tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        orthanc.auth = (job["orthanc_user"], job["orthanc_password"])
        orthanc.headers["Accept-Encoding"] = "identity"
        for orthanc_id in job["instances"]:
            size += process(
                job, orthanc=orthanc, s3=s3, orthanc_id=orthanc_id, tmp=Path(tmp), seconds=seconds
            )
    result = {
        "work_s": round(time.perf_counter() - began, 4),
        "steps_s": {k: round(v, 4) for k, v in seconds.items()},
        "instances": len(job["instances"]),
        "bytes": size,
    }
    print(json.dumps(result))
    return 0


def process(
    job: dict[str, Any],
    *,
    orthanc: requests.Session,
    s3: Any,
    orthanc_id: str,
    tmp: Path,
    seconds: dict[str, float],
) -> int:
    """GET, render, encode, PUT one instance; add each step's time; return its size."""
    mark = time.perf_counter()
    answer = orthanc.get(f"{job['orthanc_url']}/instances/{orthanc_id}/file", timeout=60)
    answer.raise_for_status()
    body = answer.content
    path = tmp / f"{orthanc_id}.dcm"
    path.write_bytes(body)
    mark = _lap(seconds, "get", mark)
    ds = imaging.read_dicom(path)
    pixels = imaging.render_8bit(ds).pixels
    mark = _lap(seconds, "render", mark)
    jpeg = encoding.encode_jpeg(pixels)
    encoding.model_input_png(pixels, job["max_side"])
    mark = _lap(seconds, "encode", mark)
    root = f"{job['prefix']}/studies/{ds.StudyInstanceUID}/input"
    sop = ds.SOPInstanceUID
    s3.put_object(Bucket=job["bucket"], Key=f"{root}/dicom/{sop}.dcm", Body=body,
                  ContentType="application/dicom")  # fmt: skip
    s3.put_object(Bucket=job["bucket"], Key=f"{root}/original/{sop}.jpg", Body=jpeg,
                  ContentType="image/jpeg")  # fmt: skip
    _lap(seconds, "put", mark)
    path.unlink()
    return len(body)


def _lap(seconds: dict[str, float], step: str, mark: float) -> float:
    """Add the time since ``mark`` to ``step``; return now."""
    now = time.perf_counter()
    seconds[step] += now - mark
    return now


if __name__ == "__main__":
    sys.exit(main(sys.argv))
