"""Our Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV arena.

Weights come from `service.runtime.loader` under HF names, dense or quantized, and live on the model's
device with everything it computes from (rope tables; the KV arena is the runner's). Every op goes through
the kernel backend chosen once for that device (`kernels.ops.select_kernels`). The residual stream is kept
in float32; matmul inputs, K/V and attention run in the compute dtype (bfloat16 on the fast CPU path and on
GPUs, float32 for the exact reference path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kernels import native, native_matmul, ops
from kernels.lora import FUSED_GROUPS, LoraSegments, fused_lora
from kernels.ops import Kernels, select_kernels
from kernels.quant import QuantizedTensor
from kernels.quant_cpu import dense_bytes, fused_max_rows
from service.runtime.arch import ModelArch

Weight = torch.Tensor | QuantizedTensor
REFINE_TOP = 16  # bf16 logits recomputed exactly for this many leading candidates per row


class KVCache:
    """One preallocated arena for all layers: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.arena = torch.zeros(arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim,
                                 dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.arena[i, 0], self.arena[i, 1]

    @staticmethod
    def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem


@dataclass
class LoraStep:
    """The LoRA part of one forward: token segments per slot and the slot table [layer][group] -> the slots'
    weights; or, for a fixed-shape step replayed as a graph, tiles on the device ([capacity, 3] int64) and per
    layer and group the slots' `SlotTables` (the Triton backend's `sgmv_static_`)."""

    segments: LoraSegments | torch.Tensor
    table: list[dict[str, Any]]
    # the slot table's load count (`LoraSlots.version`): steps of the same segments over the same version read the
    # same weights, so what the fused decode layers build from them is reused (None: rebuilt every step)
    version: int | None = None

    def apply_(self, kn: Kernels, y: torch.Tensor, x: torch.Tensor, layer: int, group: str,
               fused: native.FusedLoraArgs | None = None) -> None:
        """y += the LoRA delta of x under `group`'s weights of `layer`; `fused`: this step's table as
        `kernels.lora.fused_lora` built it, offered first to the backend's `sgmv_fused_` (the same deltas)."""
        if fused is not None and kn.sgmv_fused_(y, x, fused, layer, FUSED_GROUPS.index(group)):  # type: ignore[attr-defined]
            return
        w = self.table[layer][group]
        if isinstance(self.segments, torch.Tensor):
            kn.sgmv_static_(y, x, self.segments, w)  # type: ignore[attr-defined]  # the Triton backend's
        else:
            kn.sgmv_(y, x, self.segments, w)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden] float32
    qkv: Weight  # [q_size + 2 * kv_size, hidden]: q, k, v rows fused into one matmul
    qkv_bias: torch.Tensor | None
    o: Weight  # [hidden, q_size]
    post_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]: gate rows then up rows
    down: Weight  # [hidden, intermediate]


def cat_rows(ws: list[Weight]) -> Weight:
    """Stack weights along the output dimension, keeping quantized ones quantized."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.cat(ws, 0)
    if not all(isinstance(w, QuantizedTensor) for w in ws):
        return torch.cat([w.dequantize() if isinstance(w, QuantizedTensor) else w.float() for w in ws], 0)
    return QuantizedTensor.cat_rows(ws)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, with Llama 3 style frequency scaling when configured."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = arch.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        inv = scaled
    elif kind == "linear":
        inv = inv / rs["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported: supported are llama3, linear, default")
    return inv.float()


class LlamaModel:
    def __init__(self, arch: ModelArch, tensors: dict[str, Weight], dtype: torch.dtype = torch.bfloat16,
                 max_model_len: int | None = None, *, device: torch.device | str = "cpu",
                 kernels: Kernels | None = None, dense_weights_bytes: int = 0) -> None:
        """`tensors` may be on the CPU: they are moved to `device` here. `kernels`: the backend (default: the
        one `select_kernels` picks for the device). `dense_weights_bytes`: on the CPU's bf16 path, hold dense
        bf16 copies of the quantized matmul weights, for batched steps, when they take at most this much."""
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.kernels = kernels if kernels is not None else select_kernels(self.device)
        self.max_model_len = max_model_len or arch.max_position_embeddings
        dev = self.device

        def get(name: str) -> Weight:
            if name not in tensors:
                raise ValueError(f"weight {name!r} is missing from the checkpoint")
            w = tensors[name]
            return w.to(dev) if isinstance(w, QuantizedTensor) else w.to(dev, dtype)

        def norm(name: str) -> torch.Tensor:
            w = tensors.get(name)
            return w.dequantize().to(dev) if isinstance(w, QuantizedTensor) else get(name).float()

        embed = tensors["model.embed_tokens.weight"]
        self.embed = embed.to(dev) if isinstance(embed, QuantizedTensor) else embed.to(dev, torch.float32)
        self.lm_head = self.embed if arch.tie_word_embeddings or "lm_head.weight" not in tensors else get("lm_head.weight")
        if isinstance(self.lm_head, torch.Tensor):
            self.lm_head = self.lm_head.to(dtype)
        self.final_norm = norm("model.norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            bias = None
            if arch.attention_bias:
                bias = torch.cat([tensors[a + f"{n}_proj.bias"].float() for n in "qkv"]).to(dev, dtype)
            self.layers.append(LayerWeights(
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=cat_rows([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]),
                qkv_bias=bias,
                o=get(a + "o_proj.weight"),
                post_norm=norm(p + "post_attention_layernorm.weight"),
                gate_up=cat_rows([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
                down=get(m + "down_proj.weight"),
            ))
        inv = rope_inv_freq(arch)
        t = torch.arange(self.max_model_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], -1)  # [max_len, head_dim]: HF rotate-half layout
        self._cos, self._sin = emb.cos().to(dev), emb.sin().to(dev)
        self.scale = arch.head_dim ** -0.5
        self.dense_weights = False
        if dtype == torch.bfloat16 and dev.type == "cpu" and self.kernels.name == "torch":
            # the CPU bf16 fast-path layouts, built now rather than on the first request
            matmuls = [w for w in self._matmul_weights() if isinstance(w, QuantizedTensor)]
            self.dense_weights = 0 < sum(map(dense_bytes, matmuls)) <= dense_weights_bytes
            for w in self._weights():
                if isinstance(w, QuantizedTensor):
                    # the head's float32 copy unrounded: `compute_logits` reads exact logits from it
                    w.prepack(dense=self.dense_weights and any(w is m for m in matmuls), exact=w is self.lm_head)
        # Decode steps of at most this many tokens run their layers in one C call (kernels/cpu/layers.c).
        self._fused_rows = self._fused_rows_limit()
        # The op-by-op layers' LoRA from one table a step (`kernels.lora.fused_lora`) through the C kernel's
        # per-group entry, rather than one argument list built per projection: the CPU torch backend on bf16.
        self._table_lora = (dev.type == "cpu" and dtype == torch.bfloat16 and self.kernels.name == "torch"
                            and hasattr(self.kernels, "sgmv_fused_") and native.library() is not None)
        self._fused_table: tuple[KVCache, native.DecodeLayers] | None = None
        self._fused_lora_cache: tuple[tuple, native.FusedLoraArgs | None] | None = None  # ((version, segments), args)

    def _fused_rows_limit(self) -> int:
        """The most tokens a step may have for `native.decode_layers` to run its layers (0: never): the CPU torch
        backend on bf16 with the C kernels, no biases, every layer matmul an int4 weight one of the C int4 kernels
        takes (`quant_cpu.fused_max_rows`; the fused layers give the rows from which `linear` takes the dense copy
        to its kernel, as `linear` does)."""
        if not (self.device.type == "cpu" and self.dtype == torch.bfloat16 and self.kernels.name == "torch"
                and hasattr(self.kernels, "decode_layers") and native.library() is not None and self.layers
                and all(lw.qkv_bias is None for lw in self.layers)):
            return 0
        ws = [w for lw in self.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        if not all(isinstance(w, QuantizedTensor) for w in ws):
            return 0
        return min(fused_max_rows(w) for w in ws)  # type: ignore[arg-type]

    def _decode_layers(self, kv: KVCache) -> native.DecodeLayers:
        """The pointer table of the fused decode layers over `kv`'s arena, built on first use for that arena."""
        if self._fused_table is None or self._fused_table[0] is not kv:
            n = len(self.layers)
            self._fused_table = (kv, native.decode_layer_table([
                (lw.qkv, lw.o, lw.gate_up, lw.down, lw.post_norm, self.layers[i + 1].input_norm if i + 1 < n else None,
                 *kv.layer(i)) for i, lw in enumerate(self.layers)], self.arch.num_heads))
        return self._fused_table[1]

    def _fused_lora(self, lora: LoraStep) -> native.FusedLoraArgs | None:
        """The step's LoRA as the fused layers read it (`kernels.lora.fused_lora`; None: they cannot take it),
        reused while the segments and the slot table's version stay the same (building it walks every layer and
        group: ~0.5 ms a step in Python)."""
        key = (lora.version, lora.segments)
        if lora.version is not None and self._fused_lora_cache is not None and self._fused_lora_cache[0] == key:
            return self._fused_lora_cache[1]
        args = fused_lora(lora.segments, lora.table)  # type: ignore[arg-type]  # LoraSegments: checked by forward
        if lora.version is not None:
            self._fused_lora_cache = (key, args)
        return args

    def _matmul_weights(self) -> list[Weight]:
        ws: list[Weight] = [self.lm_head]
        for lw in self.layers:
            ws += [lw.qkv, lw.o, lw.gate_up, lw.down]
        return ws

    def _weights(self) -> list[Weight]:
        ws: list[Weight] = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            ws.append(self.lm_head)
        for lw in self.layers:
            ws += [lw.input_norm, lw.qkv, lw.o, lw.post_norm, lw.gate_up, lw.down]
            if lw.qkv_bias is not None:
                ws.append(lw.qkv_bias)
        return ws

    def nbytes(self) -> int:
        """Resident bytes of the weights, including the fast-path layouts built for them."""
        return sum(w.nbytes if isinstance(w, QuantizedTensor) else w.numel() * w.element_size()
                   for w in self._weights())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: ops.AttentionPlan,
                kv: KVCache, lora: LoraStep | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (float32, after the last norm).

        `lora`: which tokens use which adapter slot this step, and the slot table; None = base model only.
        A step of at most `_fused_rows` tokens is first offered to the backend's `decode_layers` (all layers in one
        C call, the same results); the layers run op by op when it declines.
        """
        arch, dt = self.arch, self.dtype
        eps = arch.rms_norm_eps
        kn = self.kernels
        x = kn.embedding(input_ids, self.embed)  # [T, hidden] float32 residual stream
        if not self.layers:
            return kn.add_rms_norm(x, None, self.final_norm, eps, torch.float32)
        hs = kn.add_rms_norm(x, None, self.layers[0].input_norm, eps, dt)
        # A step that computes prompt tokens (an entry of several new tokens; verify passes are single-token
        # entries) keeps to the matmul path a whole prompt takes (`quant_cpu.linear`'s `prompt`).
        prompt = any(n > 1 for n in plan.lens)
        if x.shape[0] <= self._fused_rows and (lora is None or isinstance(lora.segments, LoraSegments)):
            fl = None if lora is None else self._fused_lora(lora)
            if lora is None or fl is not None:
                down = kn.decode_layers(x, hs, self._decode_layers(kv), positions, self._cos, self._sin, plan, eps,
                                        self.scale, fl, prompt)
                if down is not None:
                    return kn.add_rms_norm(x, down, self.final_norm, eps, torch.float32)
        table = None  # the step's LoRA table for the op-by-op layers' C calls
        if lora is not None and self._table_lora and isinstance(lora.segments, LoraSegments):
            table = self._fused_lora(lora)  # reused from the fused layers' try when they declined
        for i, lw in enumerate(self.layers):
            qkv = kn.linear(hs, lw.qkv, lw.qkv_bias, prompt)  # [T, q + 2kv]
            if lora is not None:
                lora.apply_(kn, qkv, hs, i, "qkv", table)
            k_cache, v_cache = kv.layer(i)
            q = kn.rope_write_kv(qkv, positions, self._cos, self._sin, k_cache, v_cache, plan.slot_mapping,
                                 arch.num_heads)
            attn = kn.paged_attention(q, k_cache, v_cache, plan, self.scale)  # [T, h, d]
            attn = attn.reshape(attn.shape[0], arch.q_size)
            o = kn.linear(attn, lw.o, prompt=prompt)
            if lora is not None:
                lora.apply_(kn, o, attn, i, "o", table)
            hs = kn.add_rms_norm(x, o, lw.post_norm, eps, dt)
            gu = kn.linear(hs, lw.gate_up, prompt=prompt)  # [T, 2 * inter]
            if lora is not None:
                lora.apply_(kn, gu, hs, i, "gate_up", table)
            act = kn.silu_mul(gu)
            down = kn.linear(act, lw.down, prompt=prompt)
            if lora is not None:
                lora.apply_(kn, down, act, i, "down", table)
            # the residual add, and the norm of what reads it next: the next layer's input or the final norm
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
            hs = kn.add_rms_norm(x, down, nxt, eps, dt if i + 1 < len(self.layers) else torch.float32)
        return hs

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] (float32) -> logits [S, vocab] float32."""
        if self.dtype != torch.float32:
            # batched rows on a CPU that holds the head's float32 copy: float32 logits from it directly
            exact = self.kernels.linear_f32(hidden, self.lm_head)
            if exact is not None:
                return exact
        logits = self.kernels.linear(hidden.to(self.dtype), self.lm_head)
        if self.dtype == torch.float32:
            return logits.float()
        # bf16 logits near 25 are rounded to steps of 0.125: enough to swap the top two tokens. Recompute the
        # leading candidates of every row exactly in float32 (a few rows of the head), so greedy choices and top
        # logprobs match the float32 model.
        w = self.lm_head
        q8 = isinstance(w, QuantizedTensor) and w.kind == "int8" and w.group_size == 32 and logits.is_cpu
        if q8:
            # in one C pass (the head of the default model: 0.25-3 ms a step in torch); from bf16 logits each row
            # is widened to float32 and refined while it is in cache
            h = hidden.float().contiguous()
            exact = native_matmul.refine_top_q8_bf16(logits, h, w.qweight, w.scales, REFINE_TOP)
            if exact is not None:
                return exact
        logits = logits.float()
        if q8 and native_matmul.refine_top_q8(logits, h, w.qweight, w.scales, REFINE_TOP):
            return logits
        top = logits.topk(REFINE_TOP, dim=-1).indices  # [S, k]
        rows = w.rows(top.reshape(-1)).dequantize() if isinstance(w, QuantizedTensor) else w[top.reshape(-1)].float()
        exact = torch.einsum("sh,skh->sk", hidden.float(), rows.view(*top.shape, -1))
        logits.scatter_(1, top, exact)
        return logits

