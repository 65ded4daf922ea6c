"""`loraserve serve` and `loraserve call` as processes, on the tiny model: ready line, call, SIGTERM."""

from __future__ import annotations

import re
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


def test_uploading_a_directory_that_is_no_adapter_is_a_clear_error_before_anything_is_sent(served, tmp_path):
    """Checked by the client before the upload starts: raised while gRPC iterates the messages, the same error
    used to reach the caller as UNKNOWN ("Exception iterating requests!") after a traceback."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text("{}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    a_file = config_only / "adapter_config.json"
    for where, words in ((config_only, "adapter_model.safetensors is missing: an adapter directory holds"),
                         (pickled, "adapter_model.bin, a pickle file, which the service never loads"),
                         (a_file, "is not a directory"), (tmp_path / "nowhere", "does not exist")):
        r = cli("adapters", "upload", str(where), "--name", "bad", "--target", served.address)
        assert r.returncode == 2 and words in r.stderr, (where, r.stderr)
        assert "Traceback" not in r.stderr and "UNKNOWN" not in r.stderr, r.stderr
    with LoraServeClient(served.address, timeout=30) as c:
        with pytest.raises(FileNotFoundError):
            c.upload_adapter(config_only, "bad")
        assert [a.name for a in c.list_adapters()] == ["tiny-lora"]  # nothing registered


def test_json_output_of_call_and_adapter_commands(served):
    import json

    args = ("call", "--target", served.address, "--prompt", "t5 t6 t7", "--raw", "--temperature", "0",
            "--max-tokens", "4", "--json")
    unary = cli(*args)
    assert unary.returncode == 0, unary.stderr
    body = json.loads(unary.stdout)
    assert len(body["token_ids"]) == 4 and body["finish_reason"] == "FINISH_REASON_LENGTH" and body["text"]
    streamed = cli(*args, "--stream")
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [t for m in lines for t in m.get("token_ids", [])] == body["token_ids"]
    assert lines[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    promoted = cli("adapters", "promote", "tiny-lora", "1", "--target", served.address, "--json")
    assert promoted.returncode == 0 and json.loads(promoted.stdout)[0]["name"] == "tiny-lora"


def test_usage_buckets_are_labelled_and_a_zero_bucket_is_named(served):
    with LoraServeClient(served.address, timeout=30) as c:
        c.generate("t5 t6", temperature=0, max_tokens=2)
    r = cli("usage", "--target", served.address, "--bucket", "1h")
    assert r.returncode == 0 and r.stdout.split()[0] == "BUCKET", r.stdout
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r.stdout.splitlines()[1]), r.stdout
    r = cli("usage", "--target", served.address, "--bucket", "0s")
    assert r.returncode == 2 and "duration '0s' is invalid: it must be longer than 0" in r.stderr


def test_out_of_range_sampling_values_name_the_field_before_any_call():
    from service.api.gen.loraserve.v1 import inference_pb2 as pb
    from service.client import build_request

    with pytest.raises(ValueError, match=r"max_tokens=-5 is invalid: Value out of range"):
        build_request(pb.GenerateRequest, "hi", max_tokens=-5)
    r = cli("call", "--target", "127.0.0.1:1", "--prompt", "hi", "--seed", "-1")
    assert r.returncode == 2 and "seed=-1 is invalid" in r.stderr


def test_bench_help_lists_the_workloads():
    r = cli("bench", "--help")
    assert r.returncode == 0 and "engine multi_lora" in r.stdout and "fairness" in r.stdout, r.stdout + r.stderr


def test_an_unauthenticated_call_tells_the_cli_user_how_to_give_a_key(capsys):
    import argparse

    from service.cli_client import run_remote

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAUTHENTICATED

        def details(self):
            return "no credentials: send 'authorization: Bearer <API key>' metadata"

    def refuse(client):
        raise Refused()

    args = argparse.Namespace(target="127.0.0.1:1", api_key=None, timeout=1, tls=False, tls_ca=None, tls_cert=None,
                              tls_key=None)
    assert run_remote(refuse, args) == 2
    assert "give the key with --api-key or LORASERVE_API_KEY" in capsys.readouterr().err
