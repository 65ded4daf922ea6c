"""A store that cannot be used at start (no credentials, unreachable endpoint, missing bucket): `serve` listens
with health NOT_SERVING, answers other calls UNAVAILABLE naming the problem, and retries until it works."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from service.client import LoraServeClient
from service.config import ServerConfig, ServiceConfig
from service.server import open_store_waiting
from tests.deploy.conftest import TEST_KEY_ID

RETRY_S = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Waiting:
    """open_store_waiting on its own thread, on a known port."""

    def __init__(self, svc: ServiceConfig) -> None:
        self.port = free_port()
        self.stop = threading.Event()
        self.result: object = "pending"
        self.thread = threading.Thread(target=self._run, args=(svc,), daemon=True)
        self.thread.start()
        self.client = LoraServeClient(f"127.0.0.1:{self.port}", timeout=5)

    def _run(self, svc: ServiceConfig) -> None:
        self.result = open_store_waiting(ServerConfig(port=self.port), svc, self.stop, retry_s=RETRY_S)

    def refusal(self) -> grpc.RpcError:
        """Health NOT_SERVING for the server and its services; a Generate refused with UNAVAILABLE."""
        deadline = time.monotonic() + 10
        while True:
            try:
                assert self.client.health() == "NOT_SERVING"
                break
            except grpc.RpcError as e:  # not listening yet
                assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.05)
        assert self.client.health("loraserve.v1.InferenceService") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            self.client.generate("hi", max_tokens=1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        return info.value

    def finish(self, timeout: float) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still waiting for the store"
        self.client.close()
        return self.result


def s3_config(url: str, bucket: str) -> ServiceConfig:
    return ServiceConfig(store_kind="s3", s3_bucket=bucket, s3_endpoint_url=url)


def test_missing_credentials_then_set(s3_server, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    w = Waiting(s3_config(s3_server.url, bucket))
    details = w.refusal().details()
    assert "no S3 credentials found" in details and "AWS_ACCESS_KEY_ID" in details and f"retrying every {RETRY_S:g}s" \
        in details
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY_ID)
    store, sc = w.finish(timeout=RETRY_S + 5)
    assert sc.port == w.port and store.exists("v-" + "0" * 24) is False
    with socket.socket() as s:  # the waiting server let the port go, for the real one
        # as a server binds (gRPC sets SO_REUSEADDR): a connection of the waiting server's in TIME_WAIT does not
        # block it, a listener still open would
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", w.port))
        s.listen()


def test_missing_bucket_then_created(s3_server):
    name = f"adapters-later-{time.time_ns() % 10**9}"
    w = Waiting(s3_config(s3_server.url, name))
    assert f"bucket {name!r}" in w.refusal().details() and "does not exist" in w.refusal().details()
    s3_server.client().create_bucket(Bucket=name)
    store, _ = w.finish(timeout=RETRY_S + 5)
    assert store.list_ids() == []


def test_unreachable_endpoint_until_stopped():
    w = Waiting(s3_config(f"http://127.0.0.1:{free_port()}", "adapters"))
    assert "cannot reach the S3 endpoint" in w.refusal().details()
    w.stop.set()
    assert w.finish(timeout=RETRY_S + 10) is None


def test_a_store_config_that_is_wrong_as_written_fails_at_once():
    with pytest.raises(ValueError, match="unknown s3 store setting|not a valid bucket name"):
        open_store_waiting(ServerConfig(port=0), s3_config("http://127.0.0.1:1", "Bad_Bucket"), threading.Event())
