"""`loraserve serve` and `loraserve call` as processes, on the tiny model: ready line, call, SIGTERM."""

from __future__ import annotations

import signal

import grpc
import pytest

from service.client import LoraServeClient
from service.loop import wait_until
from tests.api.serve_process import ServeProcess, cli

TINY_ARGS = ("--dtype", "float32", "--kv-cache-gib", "0.004", "--threads", "1")


@pytest.fixture(scope="module")
def served(tiny):
    model, adapter = tiny
    proc = ServeProcess("--model", str(model), "--adapter", f"tiny-lora={adapter}", *TINY_ARGS,
                        "--max-num-seqs", "4", "--drain-grace-s", "5")
    yield proc
    proc.kill()


def test_ready_line_names_the_address_and_logs_are_json_with_request_ids(served):
    assert served.address.startswith("127.0.0.1:") and not served.address.endswith(":0")
    with LoraServeClient(served.address, timeout=30) as c:
        c.generate("t5 t6", temperature=0, max_tokens=3)
    assert wait_until(lambda: any(e.get("event") == "request_finished" for e in served.events()), 5), \
        "no request_finished log line"
    finished = [e for e in served.events() if e.get("event") == "request_finished"][-1]
    assert finished["request_id"].startswith("req-") and finished["output_tokens"] == 3
    assert any(e.get("event") == "adapter_registered" and e["name"] == "tiny-lora" for e in served.events())


def test_call_prints_the_answer_unary_and_streamed(served):
    args = ("call", "--target", served.address, "--prompt", "t5 t6 t7", "--raw", "--temperature", "0",
            "--max-tokens", "6")
    unary, streamed = cli(*args), cli(*args, "--stream")
    assert unary.returncode == 0 and streamed.returncode == 0, unary.stderr + streamed.stderr
    assert len(unary.stdout.split()) == 6 and unary.stdout == streamed.stdout
    with_adapter = cli(*args, "--adapter", "tiny-lora")
    assert with_adapter.returncode == 0 and with_adapter.stdout != unary.stdout
    labelled = cli(*args, "--label", "feature=cli-test", "--label", "team=search")
    assert labelled.returncode == 0 and labelled.stdout == unary.stdout
    assert cli(*args, "--label", "no-equals").stderr.strip().endswith("expected KEY=VALUE")
    assert "INVALID_ARGUMENT" in cli(*args, "--label", "Bad=x").stderr  # the server names the bad key


def test_call_reports_errors_with_their_status(served):
    r = cli("call", "--target", served.address, "--prompt", "t5", "--raw", "--adapter", "nope")
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr and "'nope' not found" in r.stderr
    r = cli("call", "--target", served.address, "--prompt", "t5", "--raw", "--top-p", "2")
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr and "top_p" in r.stderr


def test_bad_serve_options_fail_before_loading_anything():
    r = cli("serve", "--adapter", "no-equals-sign")
    assert r.returncode == 2 and "NAME=DIR" in r.stderr
    r = cli("serve", "--adapter", "Bad Name=/tmp")
    assert r.returncode == 2 and "not a valid adapter name" in r.stderr
    r = cli("serve", "--port", "70000", "--model", "/nonexistent")
    assert r.returncode == 2 and "port=70000" in r.stderr


def test_sigterm_drains_and_exits_zero(tiny):
    proc = ServeProcess("--model", str(tiny[0]), *TINY_ARGS)
    try:
        with LoraServeClient(proc.address, timeout=30) as c:
            assert c.health() == "SERVING"
        assert proc.stop(signal.SIGTERM, timeout=30) == 0
        names = [e.get("event") for e in proc.events()]
        assert names.index("server_draining") < names.index("server_stopped")
    finally:
        proc.kill()


def test_unreachable_target_is_unavailable():
    r = cli("call", "--target", "127.0.0.1:1", "--prompt", "hi", "--timeout", "5")
    assert r.returncode == 1 and grpc.StatusCode.UNAVAILABLE.name in r.stderr
