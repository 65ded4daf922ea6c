"""Stalled clients hold nothing for long: the stall watchdog, call slots, and unread streams over a real socket."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc
from service.api.stalls import CallSlots, StallWatchdog
from service.limits import LimitExceeded
from service.loop import wait_until
from tests.api.conftest import TENANT_KEYS, write_tenants


class Call:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_the_watchdog_cancels_only_calls_that_waited_on_their_client_too_long():
    now = [0.0]
    fired: list[str] = []
    dog = StallWatchdog(5.0, fired.append, clock=lambda: now[0])
    slow, reading, idle = Call(), Call(), Call()
    w_slow, w_reading = dog.watch(slow, "write"), dog.watch(reading, "read")
    dog.watch(idle, "write")  # never waits on its client (it waits on the engine): never cancelled
    w_slow.waiting()
    w_reading.waiting()
    now[0] = 4.0
    w_reading.done()  # the client took the message in time
    w_reading.waiting()
    now[0] = 5.5
    assert dog.check() == 1 and (slow.cancelled, reading.cancelled, idle.cancelled) == (1, 0, 0)
    assert fired == ["write"] and dog.num_watched == 2  # the cancelled call is forgotten
    now[0] = 9.5
    assert dog.check() == 1 and reading.cancelled == 1 and fired == ["write", "read"]
    now[0] = 100.0
    assert dog.check() == 0 and idle.cancelled == 0
    with pytest.raises(ValueError, match="must be > 0"):
        StallWatchdog(0)


def test_a_watched_request_stream_is_read_under_watch():
    now = [0.0]
    dog = StallWatchdog(1.0, clock=lambda: now[0])
    wait = dog.watch(Call(), "read")
    seen = []
    for item in wait.iterate(iter([1, 2])):
        assert wait.since is None  # not waiting on the client while the handler works
        seen.append(item)
    assert seen == [1, 2] and wait.since is None
    wait.close()
    assert dog.num_watched == 0


def test_call_slots_refuse_past_capacity_and_release_once():
    slots = CallSlots(2)
    a, b = slots.acquire("generation"), slots.acquire("upload")
    with pytest.raises(LimitExceeded, match="limit of 2 generation and upload calls") as info:
        slots.acquire("generation")
    assert info.value.retry_after_s > 0
    a()
    a()  # idempotent
    assert slots.in_use == 1
    slots.acquire("generation")
    b()
    assert slots.in_use == 1


def auth(who: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TENANT_KEYS[who]}"),)


def test_unread_streams_hold_no_thread_past_the_stall_timeout_and_health_answers(make_server, tmp_path):
    """alice opens many streams and never reads them: her concurrency limit holds until each stream's last
    message is written, the stalled ones are cancelled after the stall timeout (counted), and meanwhile
    health and bob's requests are answered. Bad input: streams nobody reads."""
    limits = "{max_concurrent_requests: 4}"
    server = make_server(server={"grpc_workers": 12, "client_stall_timeout_s": 3.0}, max_num_seqs=16,
                         service={"tenants_file": write_tenants(tmp_path / "t.yaml", limits), "metrics_port": 0})
    # alice's client grants a small HTTP/2 window and never reads past the first message: after a few KB of
    # 20-alternative messages the server's writes block, as they do for any client that stops reading.
    slow = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0),
                                                         ("grpc.http2.lookahead_bytes", 8192)])
    alice = inference_pb2_grpc.InferenceServiceStub(slow)
    sp = pb.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, logprobs=20)
    unread, refused = [], 0
    for _ in range(12):
        call = alice.GenerateStream(pb.GenerateStreamRequest(text="t5 t6", sampling=sp), metadata=auth("alice"))
        unread.append(call)
    for call in unread:  # each call either started (and is never read further) or was refused at once
        try:
            next(call)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in e.details()
            refused += 1
    assert refused == 12 - 4
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    bob = server.stub.Generate(pb.GenerateRequest(text="t7 t8", sampling=pb.SamplingParams(temperature=0,
                                                                                           max_tokens=5)),
                               metadata=auth("bob"), timeout=10)
    assert len(bob.token_ids) == 5
    # The engine has generated all of alice's tokens, but her streams are not written yet: they still count.
    assert wait_until(lambda: not server.engine_call(lambda e: e.has_unfinished()), 10)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(pb.GenerateRequest(text="t5", sampling=pb.SamplingParams(max_tokens=3)),
                             metadata=auth("alice"), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in info.value.details()

    def stalls() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
        lines = [ln for ln in text.decode().splitlines() if ln.startswith("loraserve_client_stalls_total")]
        return sum(float(ln.split()[-1]) for ln in lines if 'direction="write"' in ln)

    assert wait_until(lambda: stalls() >= 4, 15)  # the four unread streams were cut off
    for call in unread:
        with pytest.raises(grpc.RpcError):
            list(call)
    # alice's limit is free again, and nothing is left running
    assert wait_until(lambda: server.server.call_slots.in_use == 0, 5)
    ok = server.stub.Generate(pb.GenerateRequest(text="t5", sampling=pb.SamplingParams(temperature=0, max_tokens=3)),
                              metadata=auth("alice"), timeout=10)
    assert len(ok.token_ids) == 3
    server.wait_idle_and_intact()
    slow.close()


def test_an_upload_whose_client_stops_sending_is_cancelled(make_server, tiny):
    """Bad input: an upload that sends its manifest and then nothing."""
    import threading

    from service.api.gen.loraserve.v1 import adapters_pb2 as apb
    from service.client import upload_requests

    server = make_server(server={"client_stall_timeout_s": 1.0}, service={"metrics_port": 0})
    gone = threading.Event()

    def stalled():
        yield next(iter(upload_requests(tiny[1], "stalled")))  # the manifest
        gone.wait(30)  # then the client sends nothing more

    with pytest.raises(grpc.RpcError) as info:
        server.adapters.UploadAdapter(stalled(), timeout=20)
    gone.set()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: server.server.call_slots.in_use == 0, 5)  # the handler lets go as it ends
    assert not server.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters  # nothing was registered
    assert server.server.metrics.client_stalls.labels("read")._value.get() == 1
