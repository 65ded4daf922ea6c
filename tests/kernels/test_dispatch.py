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
        ops.kernel_mode()


def test_cpu_tensors_take_torch_unless_forced(monkeypatch):
    cpu = torch.zeros(1)
    for mode in ("auto", "torch"):
        monkeypatch.setenv("LORASERVE_KERNELS", mode)
        assert not ops.use_triton(cpu)
    monkeypatch.setenv("LORASERVE_KERNELS", "triton")
    assert ops.use_triton(cpu)  # TRITON_INTERPRET=1 is set for these tests (conftest)


def test_forcing_triton_on_cpu_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("LORASERVE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs the Triton interpreter: set TRITON_INTERPRET=1"):
        ops.use_triton(torch.zeros(1))


def test_compiled_kernel_refuses_cpu_tensors():
    """A kernel defined without the interpreter cannot run on CPU tensors: a clear error, not a crash."""
    from triton.runtime.jit import JITFunction

    from kernels.triton.common import check_launchable

    def kernel(x_ptr):
        pass

    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before kernels.triton is first imported"):
        check_launchable(JITFunction(kernel), torch.device("cpu"))


@pytest.mark.interpreter
def test_ops_route_by_override(monkeypatch):
    """Forced to Triton, ops never reach the torch implementations; on auto (CPU) never the Triton ones."""
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
    plan = ops.AttentionPlan.build([[2]], [0], [3], 4)
    torch_impls = [(quant, "quant_linear"), (lora, "sgmv_torch_"), (attention, "paged_attention_torch")]
    triton_impls = [(t_quant, "quant_linear"), (t_sgmv, "sgmv_"), (t_attention, "paged_attention")]
    results = {}
    for mode, refused in (("triton", torch_impls), ("auto", triton_impls)):
        monkeypatch.setenv("LORASERVE_KERNELS", mode)
        with monkeypatch.context() as m:
            for module, name in refused:
                m.setattr(module, name, refuse)
            y = ops.linear(x, w)
            results[mode] = (y, ops.sgmv_(y.clone(), x, seg, lw), ops.paged_attention(q, kc, vc, plan, 0.25))
    for a, b in zip(results["triton"], results["auto"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
