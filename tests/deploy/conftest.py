"""A real S3-compatible server on loopback (moto's, in this process) and an environment that reaches nothing else."""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest

TEST_KEY_ID, TEST_SECRET = "loraserve-test", "loraserve-test-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    url: str

    def client(self, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=key_id,
                            aws_secret_access_key=secret)

    def set_auth(self, enforced: bool) -> None:
        """Make the server check credentials (IAM users made on it) from the next request on, or stop."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=b"0" if enforced else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path) -> None:
    """Credentials for the loopback server only: no profile files, no instance metadata, no other endpoint."""
    import os
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask the link-local metadata address


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: S3Server, aws_env: None) -> str:
    """A new empty bucket for each test, so tests never see each other's objects."""
    name = f"adapters-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def iam_user(s3_server: S3Server, bucket: str, aws_env: None) -> Iterator[tuple[str, str]]:
    """(access key id, secret) of a user allowed s3:* on `bucket`, with the server checking credentials."""
    iam = boto3.client("iam", endpoint_url=s3_server.url, region_name=REGION, aws_access_key_id=TEST_KEY_ID,
                       aws_secret_access_key=TEST_SECRET)
    user = f"store-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
        f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
    iam.put_user_policy(UserName=user, PolicyName="adapters", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    s3_server.set_auth(True)
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        s3_server.set_auth(False)
