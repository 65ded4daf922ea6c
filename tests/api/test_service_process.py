"""The served product as processes: the adapter and usage CLI against `loraserve serve --tenants`, and
durability: kill -9 at any moment of an upload, restart, nothing committed lost, nothing partial visible."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import grpc
import pytest

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.client import LoraServeClient, upload_requests
from service.tenants import hash_api_key
from tests.api.serve_process import ServeProcess, cli

TINY_ARGS = ("--dtype", "float32", "--kv-cache-gib", "0.004", "--threads", "1", "--max-num-seqs", "4")
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(f"""tenants:
  - id: alice
    api_keys: ["{hash_api_key(ALICE)}"]
  - id: bob
    api_keys: ["{hash_api_key(BOB)}"]
""")
    return str(path)


def serve(tiny, tenants_file: str, data_dir) -> ServeProcess:
    return ServeProcess("--model", str(tiny[0]), "--tenants", tenants_file, "--data-dir", str(data_dir), *TINY_ARGS)


def remote(proc: ServeProcess, key: str, *args: str):
    return cli(*args, "--target", proc.address, "--api-key", key)


def test_adapter_and_usage_cli(tiny, tenants_file, tmp_path):
    proc = serve(tiny, tenants_file, tmp_path / "data")
    try:
        r = remote(proc, ALICE, "adapters", "upload", str(tiny[1]), "--name", "bot", "--description", "first")
        assert r.returncode == 0 and "uploaded alice/bot@1" in r.stdout, r.stderr
        r = remote(proc, ALICE, "adapters", "list", "--json")
        listed = json.loads(r.stdout)
        assert [(a["owner"], a["name"]) for a in listed] == [("alice", "bot")]
        r = remote(proc, BOB, "adapters", "list", "--json")
        assert json.loads(r.stdout) == []  # alice's private adapter is invisible to bob
        r = remote(proc, ALICE, "call", "--prompt", "t5 t6", "--raw", "--temperature", "0", "--max-tokens", "4",
                   "--adapter", "bot")
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        r = remote(proc, BOB, "call", "--prompt", "t5", "--raw", "--adapter", "alice/bot")
        assert r.returncode == 2 and "NOT_FOUND" in r.stderr
        r = remote(proc, ALICE, "adapters", "promote", "bot", "7")  # bad input: a version that does not exist
        assert r.returncode == 2 and "NOT_FOUND" in r.stderr and "no version '7'" in r.stderr
        # a response goes out only once its usage row is committed: the answered call is billed already
        rows = json.loads(remote(proc, ALICE, "usage", "--json", "--group-by", "adapter").stdout)
        assert [(x["adapter"], int(x["output_tokens"])) for x in rows] == [("alice/bot", 4)]
        r = remote(proc, ALICE, "usage", "--tenant", "bob")
        assert r.returncode == 2 and "PERMISSION_DENIED" in r.stderr and "needs the admin role" in r.stderr
        r = remote(proc, ALICE, "adapters", "delete", "bot")
        assert r.returncode == 0 and "deleted bot" in r.stdout
        r = cli("adapters", "list", "--target", proc.address)  # no key
        assert r.returncode == 2 and "UNAUTHENTICATED" in r.stderr
    finally:
        proc.stop(signal.SIGTERM)


def _upload_in_background(address: str, adapter_dir, name: str) -> threading.Thread:
    def run() -> None:
        with LoraServeClient(address, api_key=ALICE, timeout=30) as c:
            try:
                # Small chunks so that the upload is in flight for a while.
                c._adapters.UploadAdapter(upload_requests(adapter_dir, name, chunk_bytes=512), metadata=c._metadata)
            except grpc.RpcError:
                pass  # the server was killed under it

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _variant(adapter_dir, out_dir, scale: float):
    """A copy of a peft adapter with its B matrices scaled: other content, so another version and new files."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir()
    (out_dir / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: v * scale if "lora_B" in k else v for k, v in tensors.items()},
              out_dir / "adapter_model.safetensors")
    return out_dir


def test_kill_9_during_uploads_loses_nothing_committed_and_shows_nothing_partial(tiny, tenants_file, tmp_path):
    data = tmp_path / "data"
    variants = [_variant(tiny[1], tmp_path / f"variant-{i}", 1.5 + i) for i in range(3)]
    proc = serve(tiny, tenants_file, data)
    rng = random.Random(5)
    try:
        with LoraServeClient(proc.address, api_key=ALICE, timeout=30) as c:
            committed = c.upload_adapter(tiny[1], "kept").version
            served = c.generate("t5 t6 t7", adapter="kept", temperature=0, max_tokens=5)
        with LoraServeClient(proc.address, api_key=ALICE, timeout=30) as c:  # billed before it was answered
            usage = c.get_usage(group_by="tenant")
        assert usage and usage[0].output_tokens == 5
        outcomes: list[str] = []
        for trial in range(3):
            t = _upload_in_background(proc.address, variants[trial], f"partial-{trial}")
            time.sleep(rng.uniform(0.0, 0.4))  # anywhere from the manifest to the commit
            proc.stop(signal.SIGKILL)
            t.join(10)
            proc = serve(tiny, tenants_file, data)
            with LoraServeClient(proc.address, api_key=ALICE, timeout=30) as c:
                names = {a.name: a for a in c.list_adapters()}
                # Committed state is all there after every restart.
                assert names["kept"].current_version.version_id == committed.version_id
                again = c.generate("t5 t6 t7", adapter="kept", temperature=0, max_tokens=5)
                assert again.token_ids == served.token_ids
                assert c.get_usage(group_by="tenant")[0].output_tokens >= 5
                # The interrupted upload is either complete and usable, or absent: never half there.
                if f"partial-{trial}" in names:
                    loaded = c.load_adapter(f"partial-{trial}", wait=True)
                    assert loaded.version.load_state == apb.LOAD_STATE_LOADED and not loaded.error
                    r = c.generate("t5", adapter=f"partial-{trial}", temperature=0, max_tokens=2)
                    assert r.adapter_version == loaded.version.version_id != committed.version_id
                    outcomes.append("complete")
                else:
                    outcomes.append("absent")
        stored = sorted(p.name for p in (data / "adapters").iterdir())
        # Only committed versions' files remain: no temporary upload directory, no unregistered version.
        with LoraServeClient(proc.address, api_key=ALICE, timeout=30) as c:
            registered = sorted({a.current_version.version_id for a in c.list_adapters()})
        assert stored == registered, outcomes
    finally:
        proc.kill()


def test_kill_9_under_load_bills_every_finished_request_exactly_once(tiny, tenants_file, tmp_path):
    """Clients keep generating while the server is killed with SIGKILL: after a restart on the same data
    directory, every response a client received is in the usage ledger, once, with the tokens it reported
    (the last message of a response goes out only after its usage row is committed)."""
    from service.loop import wait_until
    from service.usage import UsageLedger

    data = tmp_path / "data"
    proc = serve(tiny, tenants_file, data)
    received: list[tuple[str, int, int]] = []  # (request id, input tokens, output tokens) clients got
    stop = threading.Event()

    def client(i: int) -> None:
        with LoraServeClient(proc.address, api_key=ALICE, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.generate(f"t{5 + i} t6 t7", temperature=0, max_tokens=12, ignore_eos=True)
                except grpc.RpcError:
                    return  # the server is gone
                received.append((r.request_id, r.usage.input_tokens, r.usage.output_tokens))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: len(received) >= 12, 60)
        proc.stop(signal.SIGKILL)  # mid-load: requests are running and finishing
        stop.set()
        for t in threads:
            t.join(30)
        proc = serve(tiny, tenants_file, data)  # the restarted server opens (and keeps) the same ledger
        with UsageLedger(data / "usage.db") as ledger:
            for rid, input_tokens, output_tokens in received:
                row = ledger.get(rid)
                assert row is not None, f"{rid} was answered but not billed"
                assert (row.input_tokens, row.output_tokens, row.status) == (input_tokens, output_tokens, "ok")
        with LoraServeClient(proc.address, api_key=ALICE, timeout=30) as c:
            (totals,) = c.get_usage(group_by="tenant")
        # Each received response is one row (request ids are unique keys); requests cut off by the kill
        # may add rows of their own, never a second row of a received one.
        assert totals.requests >= len(received) == len({rid for rid, _, _ in received})
    finally:
        stop.set()
        proc.kill()
