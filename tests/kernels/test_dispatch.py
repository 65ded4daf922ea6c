"""kernels.ops: which implementation runs, and the LORASERVE_KERNELS override."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.quant import quantize_int4


def test_mode_from_environment(monkeypatch):
    monkeypatch.delenv("LORASERVE_KERNELS", raising=False)
    assert ops.kernel_mode() == "auto"
    monkeypatch.setenv("LORASERVE_KERNELS", " Torch ")
    assert ops.kernel_mode() == "torch"
    monkeypatch.setenv("LORASERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LORASERVE_KERNELS='cuda' is not a kernel choice: use one of auto"):
        ops.select_kernels("cpu")


def test_the_backend_follows_the_device_unless_forced(monkeypatch):
    monkeypatch.delenv("LORASERVE_KERNELS", raising=False)
    assert ops.select_kernels("cpu").name == "torch"
    assert ops.select_kernels("cpu", "torch").name == "torch"
    assert ops.select_kernels("cpu", "triton").name == "triton"  # TRITON_INTERPRET=1 is set for the tests
    monkeypatch.setenv("LORASERVE_KERNELS", "triton")
    assert ops.select_kernels("cpu").name == "triton"  # the override, read when the backend is chosen
    with pytest.raises(ValueError, match="kernel backend 'cuda' is unknown"):
        ops.select_kernels("cpu", "cuda")


def test_forcing_triton_on_cpu_without_the_interpreter_says_how(monkeypatch):
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(RuntimeError, match="needs the Triton interpreter: set TRITON_INTERPRET=1"):
        ops.select_kernels("cpu", "triton")


def test_compiled_kernel_refuses_cpu_tensors():
    """A kernel defined without the interpreter cannot run on CPU tensors: a clear error, not a crash."""
    from triton.runtime.jit import JITFunction

    from kernels.triton.common import check_launchable

    def kernel(x_ptr):
        pass

    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before kernels.triton is first imported"):
        check_launchable(JITFunction(kernel), torch.device("cpu"))


@pytest.mark.interpreter
def test_each_backend_runs_only_its_own_implementations(monkeypatch):
    """The Triton backend never reaches the torch implementations of its ops, the torch one never the
    Triton ones; both give the same results."""
    from kernels import attention, lora, quant
    from kernels.triton import attention as t_attention
    from kernels.triton import quant as t_quant
    from kernels.triton import sgmv as t_sgmv

    def refuse(*args, **kwargs):
        raise AssertionError("the other implementation was called")

    w = quantize_int4(torch.randn(32, 64), 32)
    x = torch.randn(3, 64)
    seg = ops.LoraSegments.from_token_slots([0, 0, -1])
    lw = [(torch.randn(64, 8), torch.randn(8, 32))]
    q = torch.randn(3, 2, 16)
    kc, vc = torch.randn(4, 4, 1, 16), torch.randn(4, 4, 1, 16)
    torch_impls = [(quant, "quant_linear"), (lora, "sgmv_torch_"), (attention, "paged_attention_torch")]
    triton_impls = [(t_quant, "quant_linear"), (t_sgmv, "sgmv_"), (t_attention, "paged_attention")]
    results = {}
    for backend, refused in ((ops.TritonKernels(), torch_impls), (ops.TorchKernels(), triton_impls)):
        plan = ops.AttentionPlan.build([[2]], [0], [3], 4)
        with monkeypatch.context() as m:
            for module, name in refused:
                m.setattr(module, name, refuse)
            y = backend.linear(x, w)
            results[backend.name] = (y, backend.sgmv_(y.clone(), x, seg, lw),
                                     backend.paged_attention(q, kc, vc, plan, 0.25))
        # the plan built metadata for the backend that ran, and for no other
        kinds = {key.split(":")[0] for key in plan.derived}
        assert kinds == ({"torch"} if backend.name == "torch" else {"triton-attention"}), kinds
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
