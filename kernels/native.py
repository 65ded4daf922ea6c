"""The CPU decode kernels written in C (`kernels/cpu/*.c`), compiled once per machine and loaded with ctypes.

A decode step on the CPU is hundreds of tiny torch ops: for one token of a small model, dispatching them costs
more than the arithmetic. The C kernels do the work of several ops in one call on bfloat16 tensors. The C
compiler builds them with `-O3 -march=native` (vectorised for the CPU they run on; `-fno-trapping-math` too,
without which GCC leaves loops with float selects scalar where it has no masked instructions, as on AVX2) into a
cache folder keyed by the sources, the compiler and the flags, so a second start does not compile again.

`library()` is None when the kernels cannot be used: no C compiler, a failed build, or `LORASERVE_NATIVE=0`
(the reason is in `unavailable_reason()`); the torch implementations then run instead, and give the same
results within bfloat16 rounding (tests/kernels/test_native.py holds both to the float32 oracle).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_ENV = "LORASERVE_NATIVE"  # 0 turns the C kernels off
CACHE_ENV = "LORASERVE_KERNEL_CACHE"  # where the built library goes (default ~/.cache/loraserve/kernels)
SOURCES = ("decode.c", "quant.c", "layers.c", "gemm.c")
HEADERS = ("common.h",)
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "paged_decode_attention_bf16": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64,
                                     _i64, _f32, _int], _int),
    "decode_attention_groups": ([_ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr], _int),
    "rope_write_kv_bf16": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int], _int),
    "add_rms_norm_bf16": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int], _int),
    "silu_mul_bf16": ([_ptr, _ptr, _i64, _i64, _int], _int),
    "q8_gemv_available": ([], _int),
    "decode_attention_path": ([], _int),
    "sgmv_path": ([], _int),
    "sgmv_f32w_bf16": ([_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _int], _int),
    "sgmv_bf16w_bf16": ([_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _int], _int),
    "sgmv_long_available": ([], _int),
    "sgmv_long_bf16": ([_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _int], _int),
    "q8_gemv_bf16": ([_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int], _int),
    "quant_avx2_available": ([], _int),
    "q8_gemm_bf16": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int], _int),
    "q4_gemm_bf16": ([_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int], _int),
    "q4b_available": ([], _int),
    "q8t_available": ([], _int),
    "argmax_rows_f32": ([_ptr, _i64, _i64, _ptr, _int], _int),
    "refine_top_q8": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int], _int),
    "refine_top_q8_bf16": ([_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int], _int),
    "q8t_gemm_bf16": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int], _int),
    "q4b_gemm_bf16": ([_ptr, _ptr, _ptr, _int, _ptr, _i64, _i64, _i64, _int], _int),
    "gemm_f32w_available": ([], _int),
    "gemm_f32w_bf16": ([_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int], _int),
    "gemm_f32w_f32": ([_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int], _int),
    "gemm_bf16w_available": ([], _int),
    "gemm_bf16w_min_rows": ([], _int),
    "gemm_bf16w_bf16": ([_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int], _int),
    "decode_layers_bf16": ([_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64,
                            _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _f32, _i64, _ptr, _ptr, _ptr, _ptr, _ptr,
                            _ptr, _int, _int, _int], _int),
    "lora_group_bf16": ([_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int,
                         _int], _int),
}


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "loraserve", "kernels")
    return Path(root)


def _build(cc: str, flags: tuple[str, ...] = FLAGS) -> Path:
    src_dir = Path(__file__).parent / "cpu"
    sources = [src_dir / s for s in SOURCES]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for part in (version, " ".join(flags), *(p.read_text() for p in [*sources, *(src_dir / h for h in HEADERS)])):
        key.update(part.encode())
    out = _cache_dir() / f"loraserve_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: a concurrent start never loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, *map(str, sources), "-lm"], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    global _lib, _reason, _loaded
    _loaded = True
    if os.environ.get(NATIVE_ENV, "1").strip() in ("0", "false", "no", "off"):
        _reason = f"{NATIVE_ENV}=0"
        return
    if sys.platform == "win32":
        _reason = "the C kernels are built for POSIX systems only"
        return
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler (cc, gcc or clang) on the PATH"
        return
    try:
        _lib = build_library(cc)
    except (OSError, RuntimeError) as e:
        _reason = f"building the C kernels failed: {e}"


def build_library(cc: str, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernels compiled with `flags` (the tests also build them for a
    CPU without some instruction set, to run its code path here)."""
    lib = ctypes.CDLL(str(_build(cc, flags)))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None when they cannot be used (see `unavailable_reason`)."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _load()
    return _lib


def unavailable_reason() -> str | None:
    library()
    return _reason


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                           q_rows: torch.Tensor, ctx: torch.Tensor, tables: torch.Tensor, scale: float,
                           nq: torch.Tensor | None = None) -> bool:
    """Short runs of new tokens: sequence i's new tokens sit at rows q_rows[i] .. q_rows[i] + nq[i] - 1 of q (nq
    None: one each) and it has ctx[i] tokens in context counting them, in the blocks `tables[i]`; new token j
    attends to the first ctx[i] - nq[i] + 1 + j (causal), written to the same row of out. bf16 q/out `[T, heads,
    head_dim]` and caches `[blocks, block_size, kv_heads, head_dim]`, all contiguous; int64 q_rows/ctx/nq `[n]`,
    tables `[n, max_blocks]` (ids must be < blocks: the caller's block pool guarantees it). Sequences whose tables
    start with the same blocks (a cached prompt prefix) attend to those keys together, with the results each
    has alone, bit for bit. False when the kernels are unavailable or the shape is beyond their bounds (the caller
    runs the torch path)."""
    lib = library()
    if lib is None:
        return False
    _, bs, kvh, d = k_cache.shape
    rc = lib.paged_decode_attention_bf16(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), q_rows.data_ptr(),
        None if nq is None else nq.data_ptr(), ctx.data_ptr(), tables.data_ptr(), tables.shape[1], q_rows.shape[0],
        q.shape[1], kvh, d, bs, scale, torch.get_num_threads())
    return rc == 0


def decode_attention_groups(tables: torch.Tensor, ctx: torch.Tensor, block_size: int, nq: torch.Tensor | None = None
                            ) -> list[tuple[list[int], int]] | None:
    """The groups of sequences `paged_decode_attention` attends to a shared prefix together for these arguments:
    (the sequences, the keys they share), or None where the kernels attend to each alone (no tiled path)."""
    lib = library()
    if lib is None:
        return None
    n = tables.shape[0]
    seqs = torch.empty(n, dtype=torch.int64)
    groups = torch.empty(3 * n + 1, dtype=torch.int64)
    count = lib.decode_attention_groups(tables.data_ptr(), tables.shape[1], ctx.data_ptr(),
                                        None if nq is None else nq.data_ptr(), n, block_size, seqs.data_ptr(),
                                        groups.data_ptr())
    if count < 0:
        return None
    order, g = seqs.tolist(), groups.tolist()
    return [(order[g[3 * x]:g[3 * x + 1]], g[3 * x + 2]) for x in range(count)]


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Each row's index of its largest value (the first of equal ones), int64 `[S]`, of float32 x `[S, V]` on the
    CPU: `x.argmax(1)` in one parallel C pass. None when the kernels cannot take x or a row holds a NaN."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] == 0 or not usable(x):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    rc = library().argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can take these tensors: loaded, all on the CPU and contiguous."""
    return library() is not None and all(t.is_cpu and t.is_contiguous() for t in tensors)  # is_cpu: no device object


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int
                  ) -> torch.Tensor | None:
    """Rotate q and k of the fused projection output `qkv` [T, (heads + 2 kv_heads) * head_dim] (bf16) at
    `positions` by the float32 `cos`/`sin` tables [max_len, head_dim], write k and v at `slot_mapping` into the
    layer's bf16 arena `[blocks, block_size, kv_heads, head_dim]`; returns rotated q [T, heads, head_dim].
    None when the kernels cannot take these tensors (the caller runs the torch ops)."""
    if not usable(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping):
        return None
    kvh, d = k_cache.shape[-2:]
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype)
    rc = library().rope_write_kv_bf16(qkv.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                      q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
                                      t, num_heads, kvh, d, torch.get_num_threads())
    return q if rc == 0 else None


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> torch.Tensor | None:
    """In place x (float32 [T, hidden]) += delta (bf16 or None); returns bf16 rms_norm(x) * weight. None when
    the kernels cannot take these tensors."""
    if not usable(x, weight, *(() if delta is None else (delta,))):
        return None
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    library().add_rms_norm_bf16(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                                out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def silu_mul(gu: torch.Tensor) -> torch.Tensor | None:
    """SiLU(gate) * up of a bf16 [T, 2 * inter] gate/up output -> bf16 [T, inter]; None when unusable."""
    if not usable(gu):
        return None
    t, two = gu.shape
    out = torch.empty(t, two // 2, dtype=gu.dtype)
    library().silu_mul_bf16(gu.data_ptr(), out.data_ptr(), t, two // 2, torch.get_num_threads())
    return out


ATTENTION_PATHS = {2: "avx512-bf16", 1: "avx2", 0: "portable"}
SGMV_PATHS = {2: "avx512", 1: "avx2", 0: "portable"}


def sgmv_path() -> str | None:
    """The code path of the SGMV kernel in this build (`SGMV_PATHS`), None without the kernels."""
    lib = library()
    return None if lib is None else SGMV_PATHS[lib.sgmv_path()]


def attention_path() -> str | None:
    """The code path of the decode attention kernel in this build (`ATTENTION_PATHS`), None without the kernels."""
    lib = library()
    return None if lib is None else ATTENTION_PATHS[lib.decode_attention_path()]


LAYER_FIELDS = 20  # one layer's row of the decode_layers_bf16 pointer table (kernels/cpu/layers.c)


@dataclass
class DecodeLayers:
    """The pointer table `decode_layers_bf16` reads for one model over one KV arena, the tensors it points into
    (held, so the pointers stay valid) and the model's dimensions."""

    table: torch.Tensor  # int64 [layers, LAYER_FIELDS]
    held: list[torch.Tensor]
    hidden: int
    num_heads: int
    kv_heads: int
    head_dim: int
    inter: int
    block_size: int


@dataclass
class FusedLoraArgs:
    """A step's LoRA as `decode_layers_bf16` reads it (built by `kernels.lora.fused_lora`): `nseg` token segments
    [starts, ends) with an adapter; per (layer, group, segment) the A^T and B^T pointers (0: no weights there) and
    the rank of each of the group's output slices (3 entries, trailing zeros); per group its slices' widths."""

    nseg: int
    starts: torch.Tensor | None = None  # int64 [nseg]
    ends: torch.Tensor | None = None
    ptrs: torch.Tensor | None = None  # int64 [layers, 4, nseg, 2]
    ranks: torch.Tensor | None = None  # int64 [layers, 4, nseg, 3]
    nslices: torch.Tensor | None = None  # int64 [4]
    outs: torch.Tensor | None = None  # int64 [4, 3]
    bf16: bool = True

    @staticmethod
    def none() -> FusedLoraArgs:
        return FusedLoraArgs(0)

    def addresses(self) -> list[int | None]:
        """starts, ends, ptrs, ranks, nslices, outs as the C side takes them (None each when there is no segment)."""
        if self.nseg == 0:
            return [None] * 6
        return [t.data_ptr() for t in (self.starts, self.ends, self.ptrs, self.ranks, self.nslices, self.outs)]  # type: ignore[union-attr]


def decode_layer_table(layers: list[tuple], num_heads: int) -> DecodeLayers:
    """`layers`: per layer (qkv, o, gate_up, down, post_norm, next_norm, k_cache, v_cache): int4 weights with
    groups of 32 (duck-typed QuantizedTensors: qweight, scales, zeros, contiguous), the float32 norm weights (the
    last layer's next_norm None) and the layer's bf16 caches `[blocks, block_size, kv_heads, head_dim]`."""
    rows, held = [], []
    for qkv, o, gate_up, down, post, nxt, kc, vc in layers:
        row = []
        for w in (qkv, o, gate_up, down):
            q4b = w.packed.get("q4b")
            if q4b:  # the AVX512-BF16 kernel's layout (kernels.quant_cpu.q4b_layout): codes, scales, 0 or 1 (fp16)
                row += [q4b[0].data_ptr(), q4b[1].data_ptr(), int(q4b[1].dtype == torch.float16)]
                held += list(q4b)
            else:
                row += [w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr()]
                held += [w.qweight, w.scales, w.zeros]
            # the dense copy in the bf16 paired panels (native_matmul.gemm_pack_bf16), beside the tiled int4 layout
            # (as `quant_cpu.linear` takes it: beside that layout only)
            dense = w.packed.get("dense")
            paired = bool(q4b) and dense is not None and dense[0].dim() == 4
            row.append(dense[0].data_ptr() if paired else 0)
            held += [dense[0]] if paired else []
        row += [post.data_ptr(), 0 if nxt is None else nxt.data_ptr(), kc.data_ptr(), vc.data_ptr()]
        held += [post, kc, vc, *(() if nxt is None else (nxt,))]
        assert len(row) == LAYER_FIELDS  # the C side's enum of a row's fields
        rows.append(row)
    _, bs, kvh, d = layers[0][6].shape
    return DecodeLayers(torch.tensor(rows, dtype=torch.int64), held, layers[0][1].shape[0], num_heads, kvh, d,
                        layers[0][3].shape[1], bs)


def decode_layers(x: torch.Tensor, hs: torch.Tensor, dl: DecodeLayers, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, slot_mapping: torch.Tensor, q_rows: torch.Tensor, nq: torch.Tensor | None,
                  ctx: torch.Tensor, tables: torch.Tensor, eps: float, scale: float,
                  lora: FusedLoraArgs | None = None, prompt: bool = False) -> torch.Tensor | None:
    """Every layer of a step in one call (kernels/cpu/layers.c): x (float32 `[T, hidden]`, the residual
    stream) updated in place from the first layer's normed input hs (bf16) to the last layer's residual before its
    down projection, which is returned (bf16 `[T, hidden]`: the caller adds it and applies the final norm). The
    step's metadata as `rope_write_kv` and `paged_decode_attention` take it (every new token of the step among
    the sequences); `lora` the step's adapters (None: none); `prompt`: the step computes prompt tokens, so the
    weights' dense copies take every product, as `quant_cpu.linear`'s `prompt`. None when a kernel refused the
    step before x changed (run the layers op by op: nothing is lost); RuntimeError when one failed after."""
    lib = library()
    if lib is None or not usable(x, hs, positions, cos, sin, slot_mapping, q_rows, ctx, tables,
                                 *(() if nq is None else (nq,))):
        return None
    lo = lora if lora is not None else FusedLoraArgs.none()
    lp = lo.addresses()
    down = torch.empty(hs.shape, dtype=torch.bfloat16)
    rc = lib.decode_layers_bf16(
        x.data_ptr(), hs.data_ptr(), down.data_ptr(), dl.table.data_ptr(), dl.table.shape[0], positions.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), q_rows.data_ptr(), None if nq is None else nq.data_ptr(),
        ctx.data_ptr(), tables.data_ptr(), tables.shape[1], q_rows.shape[0], x.shape[0], dl.hidden, dl.num_heads,
        dl.kv_heads, dl.head_dim, dl.inter, dl.block_size, eps, scale, lo.nseg, *lp, int(lo.bf16), int(prompt),
        torch.get_num_threads())
    if rc == -2:
        raise RuntimeError("the fused decode layers failed after changing the residual stream (out of memory?)")
    return down if rc == 0 else None


def lora_group_(y: torch.Tensor, x: torch.Tensor, lora: FusedLoraArgs, layer: int, group: int) -> bool:
    """In place y (bf16 `[T, out]`) += the LoRA delta of x (bf16 `[T, in]`) for projection group `group` (an index
    of `kernels.lora.FUSED_GROUPS`) of `layer`, from a step's table as the fused decode layers read it (built once
    a step: each projection's call then passes a few pointers). False when the kernel cannot take it (nothing was
    changed then)."""
    lib = library()
    if (lib is None or not usable(y, x) or x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16
            or y.shape[0] != x.shape[0]):
        return False
    if lora.nseg == 0:
        return True
    layers = lora.ptrs.numel() // (4 * lora.nseg * 2)  # type: ignore[union-attr]
    rc = lib.lora_group_bf16(x.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], y.shape[1], layer, layers, group,
                             lora.nseg, *lora.addresses(), int(lora.bf16), torch.get_num_threads())
    return rc == 0


def sgmv_long_available() -> bool:
    """Whether the SGMV kernel for prompt-sized segments (bf16 pair dot products on the weights rewritten as row
    pairs, AVX512-BF16) exists on this CPU: `sgmv_` then gives it the segments of more than 24 rows with bf16
    weights (in C, so the fused decode layers split the same way); `sgmv_(..., long=True)` calls it alone."""
    lib = library()
    return lib is not None and bool(lib.sgmv_long_available())


def sgmv_(y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int]], a_t: list[torch.Tensor],
          b_t: list[torch.Tensor], ranks: list[tuple[int, ...]], outs: tuple[int, ...], long: bool = False) -> bool:
    """In place y (bf16 `[T, out]`) += (x[rows] @ A^T) @ B^T for each segment's rows `(start, end)`, with its
    contiguous A^T `[in, r]` and block-diagonal B^T `[r, out]` (output slice j, `outs[j]` columns, fed by
    `ranks[s][j]` rank rows), all float32 or all bfloat16. `long`: the kernel for prompt-sized segments (bfloat16
    weights and an even `in` only; the rank-sized intermediate rounded to bf16, as torch's bf16 products round
    it). False when the kernel cannot take it (nothing was changed then)."""
    if not usable(y, x) or any(not (a.is_contiguous() and b.is_contiguous()) for a, b in zip(a_t, b_t)):
        return False
    dtypes = {w.dtype for w in (*a_t, *b_t)}
    if long:
        if dtypes != {torch.bfloat16} or not sgmv_long_available():
            return False
        kernel = library().sgmv_long_bf16
    elif dtypes == {torch.float32}:
        kernel = library().sgmv_f32w_bf16
    elif dtypes == {torch.bfloat16}:
        kernel = library().sgmv_bf16w_bf16
    else:
        return False
    n = len(segments)
    i64 = ctypes.c_int64
    starts = (i64 * n)(*(s for s, _ in segments))
    ends = (i64 * n)(*(e for _, e in segments))
    a_ptrs = (i64 * n)(*(a.data_ptr() for a in a_t))
    b_ptrs = (i64 * n)(*(b.data_ptr() for b in b_t))
    flat = [r for rs in ranks for r in rs]
    rk = (i64 * len(flat))(*flat)
    oc = (i64 * len(outs))(*outs)
    rc = kernel(x.data_ptr(), y.data_ptr(), n, starts, ends, a_ptrs, b_ptrs, rk, len(outs), oc, x.shape[1],
                y.shape[1], torch.get_num_threads())
    return rc == 0
