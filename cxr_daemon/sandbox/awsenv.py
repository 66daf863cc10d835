"""Dummy AWS credentials for the sandbox, so boto3 talks to the local S3 at once.

Without any credentials boto3 first probes the instance-metadata service and
then fails with NoCredentialsError; the local S3 accepts any key. Credentials
the user already set are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

SANDBOX_AWS = {"AWS_ACCESS_KEY_ID": "cxrd-demo", "AWS_SECRET_ACCESS_KEY": "cxrd-demo"}


@contextmanager
def sandbox_aws_env() -> Iterator[None]:
    """Set the dummy credentials in this process while the block runs, unless some are set."""
    added = {k: v for k, v in SANDBOX_AWS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
