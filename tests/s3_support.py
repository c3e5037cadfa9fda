"""A real S3 HTTP endpoint for tests: moto's server in a subprocess on a free port.

moto accepts any key by default. ``enforce_auth`` turns on its IAM checks after the few
requests that create a user, its key and a bucket, so that a wrong key is refused as AWS
would refuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3

from tests.subprocesses import free_port, stop, wait_until_answers

TEST_KEY = "testing-key"
TEST_SECRET = "testing-secret"
TEST_REGION = "us-east-1"
_AUTH_SETUP_REQUESTS = 4
"""Requests moto serves without checking keys when auth is enforced: see ``_auth_setup``."""


def unused_endpoint() -> str:
    """An http URL on which nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


def s3_client(endpoint: str, key: str = TEST_KEY, secret: str = TEST_SECRET) -> Any:
    """A boto3 S3 client of ``endpoint``, for arranging and inspecting what tests store."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=TEST_REGION,
    )


def new_bucket(endpoint: str, key: str = TEST_KEY, secret: str = TEST_SECRET) -> str:
    """Create a bucket with a random name at ``endpoint``; its name."""
    name = f"conveyor-test-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint, key, secret).create_bucket(Bucket=name)
    return name


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on a running S3 endpoint."""

    endpoint: str
    bucket: str

    def config(self, **extra: Any) -> dict[str, Any]:
        """The ``s3`` artifact store config of this bucket (keys come from the environment)."""
        return {"bucket": self.bucket, "endpoint_url": self.endpoint, **extra}

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def keys(self) -> list[str]:
        """Every object key in the bucket."""
        listed = self.client().list_objects_v2(Bucket=self.bucket)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@dataclass(frozen=True)
class AuthServer:
    """A moto server that checks keys, with one valid key pair and a bucket it may use."""

    endpoint: str
    bucket: str
    key: str
    secret: str


@contextmanager
def moto_server(*, enforce_auth: bool = False, timeout: float = 30) -> Iterator[str]:
    """Run moto's S3 server on a free port until the block ends; yields its endpoint URL."""
    port = free_port()
    env = dict(os.environ)
    if enforce_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_AUTH_SETUP_REQUESTS)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_until_answers(
                # moto's own API answers without touching any state or auth counter.
                f"{endpoint}/moto-api/data.json",
                process,
                lambda: _text_of(log),
                timeout,
            )
            yield endpoint
        finally:
            stop(process, timeout=10)


@contextmanager
def auth_server() -> Iterator[AuthServer]:
    """A moto server that refuses unknown keys, set up with a valid key and a bucket."""
    with moto_server(enforce_auth=True) as endpoint:
        key, secret = _auth_setup(endpoint)
        bucket = new_bucket(endpoint, key, secret)
        yield AuthServer(endpoint, bucket, key, secret)


def _auth_setup(endpoint: str) -> tuple[str, str]:
    """Three of the unchecked requests: a user allowed everything and its key; the fourth
    creates the bucket with that key."""
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_KEY,
        aws_secret_access_key=TEST_SECRET,
        region_name=TEST_REGION,
    )
    iam.create_user(UserName="conveyor")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="conveyor", PolicyName="everything", PolicyDocument=json.dumps(policy)
    )
    created = iam.create_access_key(UserName="conveyor")["AccessKey"]
    return str(created["AccessKeyId"]), str(created["SecretAccessKey"])


def _text_of(log: Any) -> str:
    log.seek(0)
    return str(log.read().decode(errors="replace"))
