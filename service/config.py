"""Configuration: frozen dataclasses validated on construction (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.stores import STORE_KINDS

SCHEDULING_POLICIES = ("vtc", "fcfs")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and KV-cache limits of one engine."""

    block_size: int = 16
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 1024  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 1024  # waiting-queue bound; past it add_request refuses
    enable_prefix_caching: bool = True
    # Between tenants: `vtc` (fair share by weighted tokens served, the Virtual Token Counter) or `fcfs`
    # (priority, then arrival). Under vtc a tenant's counter grows by these weights per prompt token computed
    # and per token generated, divided by the tenant's weight (tenants file).
    scheduling_policy: str = "vtc"
    input_token_weight: float = 1.0
    output_token_weight: float = 2.0
    # Under vtc, while more than one tenant has requests in, the most prompt tokens one step computes (longer prompts
    # go on in chunks over the next steps): a tenant's new request then waits for at most a short step of other
    # tenants' prompts before its own. At or above max_num_batched_tokens it bounds nothing. 96: on the 2-core
    # AVX512-BF16 CPU with the default model (steps that carry a prompt chunk run their layers in one C call, so a
    # short step costs little more than its tokens), `make bench ARGS=fairness` gave the light tenant's TTFT p99
    # under the flood 1.73 / 1.67x its p99 alone at 96 (two runs) against 1.91 / 1.67 / 2.03x at 128 (three), and
    # 2.26x at 192; the total throughput against fcfs 0.964 / 0.929 at 96, 0.986 / 0.915 / 0.954 at 128 (bench/
    # HISTORY.md, Fair sharing under a flood). Rerun later at 128 (1.013 / 0.930 / 0.942, p99 1.44-1.56x) and 160
    # (0.925, p99 1.80x): no better over gRPC, where vtc wakes every tenant's client each step; in one process
    # (bench/fairness_replay.py) 128 and 160 buy back most of vtc's extra steps (README.md, Fair sharing under a
    # flood).
    max_shared_prefill_tokens: int = 96
    # Speculative decoding (service.engine.speculative): the default of requests that do not choose ("off",
    # "ngram", or "draft" with a draft model loaded: runtime.draft_model), the most drafts per request and step,
    # the n-gram lengths the prompt lookup tries (longest first), and the batch-level switch: drafts are added to
    # a step only while its scheduled tokens stay within
    # speculative_max_step_tokens (past that the batch is compute-bound on the CPU and drafts cost more than
    # they save).
    speculation: str = "ngram"
    # 7: a lone request's verify pass is then 8 rows, two of the 4-row blocks torch's CPU int4 matmul works in;
    # 8 drafts would start a third block for one more row (measured, copy-heavy single stream: 4 drafts 1.64x,
    # 7 drafts 1.95x, 8 drafts 1.71x over no speculation).
    max_draft_tokens: int = 7
    ngram_min: int = 1
    ngram_max: int = 4
    speculative_max_step_tokens: int = 32
    # What one more position in a step costs, relative to a single decode step's fixed cost (measured on the
    # 2-core CPU with the default model: ~8.5 ms per extra position over ~10.5 ms). A request drafts only as many
    # tokens as its acceptance rate pays for at the step's load.
    draft_token_cost: float = 0.8

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size={self.block_size} is invalid: must be a power of two in [1, 128]")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} is invalid: must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is invalid: must be >= 1")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting={self.max_waiting} is invalid: must be >= 0")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r} is invalid: use one of "
                             f"{', '.join(SCHEDULING_POLICIES)}")
        for name in ("input_token_weight", "output_token_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w < float("inf")):
                raise ValueError(f"{name}={w!r} is invalid: must be a finite number >= 0")
        if self.speculation not in ("off", "ngram", "draft"):
            raise ValueError(f"speculation={self.speculation!r} is invalid: use off, ngram or draft (draft needs "
                             "--draft-model)")
        for name, lo, hi in (("max_draft_tokens", 1, 16), ("ngram_min", 1, 64), ("ngram_max", 1, 64),
                             ("speculative_max_step_tokens", 1, 1 << 20), ("max_shared_prefill_tokens", 1, 1 << 20)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}={v!r} is invalid: must be an integer in [{lo}, {hi}]")
        c = self.draft_token_cost
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < float("inf"):
            raise ValueError(f"draft_token_cost={c!r} is invalid: must be a finite number >= 0")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min={self.ngram_min} is larger than ngram_max={self.ngram_max}")
        if self.input_token_weight == 0 and self.output_token_weight == 0:
            raise ValueError("input_token_weight and output_token_weight are both 0: fair sharing would count "
                             "no service at all; give at least one of them a positive weight")


DTYPES = ("bfloat16", "float32")
QUANTIZE_MODES = ("int8", "int4")


@dataclass(frozen=True)
class RuntimeConfig:
    """Which model to serve and how it sits in memory."""

    model: str | None = None  # a .gguf file or an HF directory; None = the embedded default model
    quantize: str | None = None  # quantize an fp16/bf16/fp32 HF checkpoint on load
    dtype: str = "bfloat16"  # compute dtype: bfloat16 (fast CPU path) or float32 (exact reference path)
    # Size of the preallocated paged KV arena; None: 1 GiB on the CPU, gpu_memory_fraction on a GPU.
    kv_cache_gib: float | None = None
    max_model_len: int | None = None  # default: the model's context length
    threads: int | None = None  # torch intra-op threads; default: all cores
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (the first GPU when there is one)
    # On a GPU: the share of its memory the server may use (weights, KV arena, activations), as vLLM's.
    gpu_memory_fraction: float = 0.9
    # On a GPU (Triton kernels): decode steps captured as CUDA graphs per batch-size bucket, replayed each step.
    cuda_graphs: bool = True
    # A smaller model with the same tokenizer (a .gguf file, an HF directory or synthetic:NAME) that proposes
    # speculative drafts for requests with speculation 'draft'; None: no draft model.
    draft_model: str | None = None
    # On the CPU (bfloat16): also hold the quantized weights dense, which batched steps multiply ~2x faster, when
    # that copy takes at most this many MiB (bf16: the default model's takes 268 MiB; float32 on a CPU without
    # native bf16, kernels/cpu_features.py: twice that); 0 never does.
    dense_weights_mib: int = 1024

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={self.quantize!r} is invalid: allowed values are {', '.join(QUANTIZE_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: allowed values are {', '.join(DTYPES)}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib} is invalid: must be > 0")
        if isinstance(self.dense_weights_mib, bool) or not isinstance(self.dense_weights_mib, int) \
                or self.dense_weights_mib < 0:
            raise ValueError(f"dense_weights_mib={self.dense_weights_mib!r} is invalid: must be an integer >= 0")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction={self.gpu_memory_fraction} is invalid: must be in (0, 1]")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} is invalid: must be true or false")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError("device is empty: use cpu, cuda, cuda:N or auto")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len={self.max_model_len} is invalid: must be >= 16")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} is invalid: must be >= 1")


@dataclass(frozen=True)
class AdapterConfig:
    """The LoRA tiers: host memory (LRU, bytes and count bounded) and active slots the batch reads."""

    max_active_adapters: int = 32  # distinct adapters in one step's batch (active slots)
    host_cache_mib: int = 2048  # host-memory tier, in model layout
    host_cache_max_count: int = 256
    max_lora_rank: int = 128
    max_overtake_steps: int = 8  # how long ready adapters may overtake one waiting for a slot
    load_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("max_active_adapters", "host_cache_mib", "host_cache_max_count", "max_lora_rank",
                     "load_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.max_overtake_steps < 0:
            raise ValueError(f"max_overtake_steps={self.max_overtake_steps} is invalid: must be >= 0")
        if self.host_cache_max_count <= self.max_active_adapters:
            # An active slot reads its version from host memory, so the slots alone could fill a smaller
            # cache and leave no room to load the next adapter.
            raise ValueError(f"host_cache_max_count={self.host_cache_max_count} must be larger than "
                             f"max_active_adapters={self.max_active_adapters}")


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC front: where to listen, how many RPC threads, how long a shutdown waits for requests."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the ready log line says which)
    drain_grace_s: float = 30.0  # on SIGTERM: running requests get this long to finish, then are aborted
    grpc_workers: int | None = None  # RPC threads; default: enough for every running and waiting request
    # A call that waits this long on its client (a streamed message not read, an upload chunk not sent) is
    # cancelled: a stalled client holds no server thread for longer.
    client_stall_timeout_s: float = 30.0
    warmup: bool = True  # run one short generation before reporting SERVING
    # The largest message the server receives, unary or one message of a stream (an upload chunk); gRPC
    # refuses a larger one with RESOURCE_EXHAUSTED before it is parsed. The client uploads 1 MiB chunks.
    max_message_mib: int = 4
    # A prompt's text, or its chat messages' content in total, in UTF-8 bytes, checked before tokenizing;
    # None: 16 per token of the context window (service.api.convert.PROMPT_BYTES_PER_TOKEN).
    max_prompt_bytes: int | None = None
    # The OpenAI-compatible HTTP front (POST /v1/chat/completions, /v1/completions, GET /v1/models, /health,
    # /metrics) on the same host; None = off, 0 = any free port.
    http_port: int | None = None
    # Tokens a streamed message gathers before it is sent (gRPC GenerateStream, HTTP stream=true). The first
    # token and the last message go at once; 1 sends every step's tokens as they come. More means fewer messages
    # and fewer wake-ups of the server's and the client's threads under many streams, at the cost of smoother
    # text: each message waits for up to this many of the stream's steps.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is empty: give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is invalid: must be in [0, 65535] (0 = any free port)")
        if self.http_port is not None and (isinstance(self.http_port, bool) or not isinstance(self.http_port, int)
                                           or not 0 <= self.http_port <= 65535):
            raise ValueError(f"http_port={self.http_port!r} is invalid: must be in [0, 65535] (0 = any free port), "
                             "or unset for no HTTP front")
        if not self.drain_grace_s >= 0:
            raise ValueError(f"drain_grace_s={self.drain_grace_s} is invalid: must be >= 0")
        if self.grpc_workers is not None and self.grpc_workers < 2:
            raise ValueError(f"grpc_workers={self.grpc_workers} is invalid: must be >= 2")
        if not self.client_stall_timeout_s > 0:
            raise ValueError(f"client_stall_timeout_s={self.client_stall_timeout_s} is invalid: must be > 0 "
                             "seconds")
        if not 2 <= self.max_message_mib <= 2047:
            # 2: an upload chunk of the client is 1 MiB of data plus its framing; gRPC counts in int32.
            raise ValueError(f"max_message_mib={self.max_message_mib} is invalid: must be in [2, 2047] "
                             "(uploads arrive in 1 MiB chunks)")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes={self.max_prompt_bytes} is invalid: must be >= 1, or unset for "
                             "16 bytes per token of the context window")
        if isinstance(self.stream_interval, bool) or not isinstance(self.stream_interval, int) \
                or not 1 <= self.stream_interval <= 1024:
            raise ValueError(f"stream_interval={self.stream_interval!r} is invalid: must be a whole number of "
                             "tokens in [1, 1024] (1: every step's tokens as they come)")


LOG_FORMATS = ("console", "json")


@dataclass(frozen=True)
class ServiceConfig:
    """What the served product adds around the engine: tenants, the adapter store, the data directory
    (registry and usage ledger), TLS, metrics, tracing and prices."""

    data_dir: str = "./data"  # registry.db, usage.db and (by default) the adapter store
    tenants_file: str | None = None  # None: open access, one admin tenant `default` (development)
    store_kind: str = "filesystem"
    store_path: str | None = None  # filesystem store root; default: <data_dir>/adapters
    s3_bucket: str | None = None
    s3_prefix: str = "loraserve"
    s3_endpoint_url: str | None = None  # credentials come from the standard AWS_* environment / files
    s3_region: str | None = None
    # The control plane (registry and usage ledger): `sqlite:///DIR` (None: the data directory; this process's
    # own) or `postgresql://user:password@host:port/db` (shared by replicas; see service.control_plane).
    database_url: str | None = None
    database_pool_size: int = 8  # connections of this process to PostgreSQL
    database_connect_timeout_s: float = 3.0  # waiting for a connection longer means the database is down
    database_lease_ttl_s: float = 20.0  # a killed replica's hold on adapter versions lasts this long at most
    metrics_port: int | None = None  # Prometheus text on a side HTTP port; None = off, 0 = any free port
    metrics_host: str | None = None  # default: the gRPC host
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # given: clients must present a certificate signed by it (mTLS)
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for spans (e.g. http://otel-collector:4317)
    log_format: str = "console"
    log_level: str = "info"
    max_upload_mib: int = 64  # per upload, unless a tenant's limits say otherwise
    price_input_per_1k: float = 0.0
    price_cached_input_per_1k: float = 0.0
    price_output_per_1k: float = 0.0
    price_unit: str = "USD"

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("data_dir is empty: give a directory for the registry and the usage ledger")
        if self.store_kind not in STORE_KINDS:
            raise ValueError(f"store kind {self.store_kind!r} is invalid: allowed values are {', '.join(STORE_KINDS)}")
        if self.store_kind == "s3" and not self.s3_bucket:
            raise ValueError("the s3 store needs a bucket (store.bucket in the config file)")
        if self.database_url is not None:
            check_database_url(self.database_url)
        if isinstance(self.database_pool_size, bool) or not isinstance(self.database_pool_size, int) \
                or not 1 <= self.database_pool_size <= 1000:
            raise ValueError(f"database.pool_size={self.database_pool_size!r} is invalid: must be an integer in "
                             "[1, 1000]")
        for name in ("database_connect_timeout_s", "database_lease_ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
                raise ValueError(f"database.{name.removeprefix('database_')}={value!r} is invalid: must be a number "
                                 "of seconds > 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port={self.metrics_port} is invalid: must be in [0, 65535] (0 = any free port)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format={self.log_format!r} is invalid: allowed values are {', '.join(LOG_FORMATS)}")
        if self.max_upload_mib < 1:
            raise ValueError(f"max_upload_mib={self.max_upload_mib} is invalid: must be >= 1")
        for name in ("price_input_per_1k", "price_cached_input_per_1k", "price_output_per_1k"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: prices must be >= 0")

    @property
    def database_kind(self) -> str:
        """sqlite (this process's files) or postgresql (shared by replicas)."""
        return "sqlite" if self.database_url is None else check_database_url(self.database_url)

    @property
    def sqlite_dir(self) -> str:
        """Where the SQLite registry and ledger live: the directory of `sqlite:///DIR`, else the data directory."""
        if self.database_url is not None and self.database_kind == "sqlite":
            return self.database_url.removeprefix("sqlite:///")
        return self.data_dir


DATABASE_KINDS = ("sqlite", "postgresql")


def check_database_url(url: object) -> str:
    """`sqlite:///DIR` or `postgresql://...` (`postgres://` too); the kind. The message never shows a password."""
    from urllib.parse import urlsplit

    if isinstance(url, str) and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return "sqlite"
    if isinstance(url, str) and url.startswith(("postgresql://", "postgres://")):
        try:
            urlsplit(url).port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:
            raise ValueError(f"database.url is not a valid PostgreSQL URL: {e}") from None
        return "postgresql"
    shown = url.split("://", 1)[0] + "://..." if isinstance(url, str) and "://" in url else repr(url)[:40]
    raise ValueError(f"database.url {shown} is invalid: use sqlite:///DIR (this process's own files in DIR; the "
                     "default is the data directory) or postgresql://user:password@host:port/database (shared by "
                     "replicas)")


def _fields(cls: type, **renames: str) -> dict[str, tuple[type, str]]:
    from dataclasses import fields

    out = {f.name: (cls, f.name) for f in fields(cls)}
    out.update({key: (cls, name) for key, name in renames.items()})
    return out


# The config file's sections: each key is a field's name (or the snake_case name of its `serve` flag) and
# says which configuration field it sets.
_SVC = ServiceConfig
_SECTIONS: dict[str, dict[str, tuple[type, str]]] = {
    "runtime": _fields(RuntimeConfig),
    "engine": _fields(EngineConfig, max_batched_tokens="max_num_batched_tokens"),
    "adapters": _fields(AdapterConfig),
    "server": {**_fields(ServerConfig), "metrics_port": (_SVC, "metrics_port"), "metrics_host": (_SVC, "metrics_host"),
               "data_dir": (_SVC, "data_dir"), "tenants": (_SVC, "tenants_file"),
               "max_upload_mib": (_SVC, "max_upload_mib")},
    "store": {"kind": (_SVC, "store_kind"), "path": (_SVC, "store_path"), "bucket": (_SVC, "s3_bucket"),
              "prefix": (_SVC, "s3_prefix"), "endpoint_url": (_SVC, "s3_endpoint_url"),
              "region": (_SVC, "s3_region")},
    "database": {"url": (_SVC, "database_url"), "pool_size": (_SVC, "database_pool_size"),
                 "connect_timeout_s": (_SVC, "database_connect_timeout_s"),
                 "lease_ttl_s": (_SVC, "database_lease_ttl_s")},
    "telemetry": {"otlp_endpoint": (_SVC, "otlp_endpoint"), "log_format": (_SVC, "log_format"),
                  "log_level": (_SVC, "log_level"), "metrics_port": (_SVC, "metrics_port"),
                  "metrics_host": (_SVC, "metrics_host")},
    "tls": {"cert": (_SVC, "tls_cert"), "key": (_SVC, "tls_key"), "client_ca": (_SVC, "tls_client_ca")},
    "pricing": {"input_per_1k": (_SVC, "price_input_per_1k"), "cached_input_per_1k": (_SVC,
                "price_cached_input_per_1k"), "output_per_1k": (_SVC, "price_output_per_1k"),
                "unit": (_SVC, "price_unit")},
}


_RETIRED = {("store", "refresh_s"): "replicas share adapter names through the database now, with no refresh "
                                   "interval (database.url: postgresql://...); remove the key"}


def read_config_file(path: str) -> dict[type, dict[str, object]]:
    """A YAML config file -> {config class: {field: value}}. Unknown sections and keys are refused by name,
    so a typo never silently falls back to a default."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"config file {path}: expected a mapping of sections ({', '.join(_SECTIONS)})")
    out: dict[type, dict[str, object]] = {}
    seen: dict[tuple[type, str], str] = {}
    for section, values in doc.items():
        if section not in _SECTIONS:
            raise ValueError(f"config file {path}: unknown section {section!r}; sections are {', '.join(_SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: section {section!r} must be a mapping of keys to values")
        allowed = _SECTIONS[section]
        for key, value in values.items():
            if (section, key) in _RETIRED:
                raise ValueError(f"config file {path}: {section}.{key} is no longer read: {_RETIRED[section, key]}")
            if key not in allowed:
                raise ValueError(f"config file {path}: unknown key {section}.{key}; allowed keys are "
                                 f"{', '.join(sorted(allowed))}")
            target = allowed[key]
            if target in seen:
                raise ValueError(f"config file {path}: {section}.{key} and {seen[target]} set the same thing; "
                                 "keep one")
            seen[target] = f"{section}.{key}"
            out.setdefault(target[0], {})[target[1]] = value
    return out
