"""A real gRPC server on loopback over a tiny random model (fast), and helpers to inspect its engine."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from service.api.gen.loraserve.v1 import adapters_pb2_grpc, inference_pb2_grpc, usage_pb2_grpc
from service.builder import build_runtime
from service.config import EngineConfig, RuntimeConfig, ServerConfig, ServiceConfig
from service.loop import wait_until
from service.server import LoraServer
from tests.tiny_models import make_tiny_model

# Word-level tiny tokenizer: words t3..t127. The template marks turns with t3/t4 so chat prompts tokenize.
CHAT_TEMPLATE = "{% for m in messages %}t3 {{ m.content }} t4 {% endfor %}{% if add_generation_prompt %}t5{% endif %}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir with a chat template, a peft LoRA adapter dir for it)."""
    import peft
    root = tmp_path_factory.mktemp("api-tiny")
    path, hf = make_tiny_model(root, "llama-gqa", layers=2)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(7)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj", "o_proj"]))
    adapter = root / "adapter"
    pm.save_pretrained(adapter)
    return path, adapter


class Server:
    """A started LoraServer plus a channel to it. A test that needs a request to stay in flight holds the
    engine loop between steps (`hold`, `resume`) instead of slowing steps down."""

    def __init__(self, model: Path, data_dir: Path, adapter: Path | None = None, *,
                 drain_grace_s: float = 10.0, service: dict | None = None, server: dict | None = None,
                 tracer_provider=None, **engine: int) -> None:
        ec = EngineConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 256, **engine})
        rt = build_runtime(RuntimeConfig(model=str(model), dtype="float32", kv_cache_gib=0.004, threads=1), ec)
        self.runtime = rt
        svc = ServiceConfig(**{"data_dir": str(data_dir), **(service or {})})
        startup = [("tiny-lora", str(adapter))] if adapter is not None else []
        sc = ServerConfig(**{"port": 0, "drain_grace_s": drain_grace_s, **(server or {})})
        self.server = LoraServer(rt, sc, svc,
                                 startup_adapters=startup, tracer_provider=tracer_provider).start()
        self.target = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.usage = usage_pb2_grpc.UsageServiceStub(self.channel)

    def engine_call(self, fn: Callable):
        return self.server.loop.call(fn)

    def hold(self, after_steps: int = 0) -> None:
        """Stop the engine after `after_steps` more model steps (see EngineLoop.hold) and wait until it did."""
        self.server.loop.hold(after_steps)
        assert self.server.loop.wait_held(10), "the engine did not reach the hold"

    def resume(self) -> None:
        self.server.loop.resume()

    def blocks_in_use(self) -> int:
        return self.engine_call(lambda e: e.pool.num_in_use)

    def wait_idle_and_intact(self, timeout: float = 10.0) -> None:
        """Until no request is unfinished; then the pool must be whole with no block in use."""
        assert wait_until(lambda: not self.engine_call(lambda e: e.has_unfinished()), timeout), \
            "requests still unfinished"
        self.engine_call(lambda e: e.check_idle_integrity())
        assert self.blocks_in_use() == 0

    def close(self) -> None:
        self.server.loop.resume()
        self.channel.close()
        self.server.shutdown(grace_s=0)


@pytest.fixture
def make_server(tiny, tmp_path) -> Iterator[Callable[..., Server]]:
    """Build servers with their own settings (and data directory); each is shut down after the test."""
    made: list[Server] = []

    def make(**kwargs) -> Server:
        kwargs.setdefault("data_dir", tmp_path / f"data{len(made)}")
        s = Server(tiny[0], **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


TENANT_KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh",
               "ops": "ops-key-0123456789abcdefgh"}


def write_tenants(path: Path, alice_limits: str = "{}") -> str:
    """A tenants file: alice (with `alice_limits`, YAML), bob, and the admin ops; keys in TENANT_KEYS."""
    from service.tenants import hash_api_key

    path.write_text(f"""
tenants:
  - id: alice
    api_keys: ["{hash_api_key(TENANT_KEYS['alice'])}"]
    limits: {alice_limits}
  - id: bob
    api_keys: ["{hash_api_key(TENANT_KEYS['bob'])}"]
  - id: ops
    admin: true
    api_keys: ["{hash_api_key(TENANT_KEYS['ops'])}"]
""")
    return str(path)



def tenants_server(tiny, root: Path, alice_limits: str = "{}", *, adapter: bool = True) -> Server:
    """A Server in `root` for the tenants of write_tenants, serving the tiny model (and, unless told not to, its
    adapter as the service's `tiny-lora`)."""
    tenants = write_tenants(root / "tenants.yaml", alice_limits)
    return Server(tiny[0], root / "data", adapter=tiny[1] if adapter else None, service={"tenants_file": tenants})

def rpc_error(fn: Callable, *args, **kwargs) -> grpc.RpcError:
    """Call and return the RpcError it must raise (a streaming call is consumed)."""
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            for _ in result:
                pass
    return info.value
