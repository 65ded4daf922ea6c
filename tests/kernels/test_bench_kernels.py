"""bench/kernels.py: says so without CUDA; its cases run and agree in the interpreter smoke run."""

from __future__ import annotations

import pytest
import torch

from bench import kernels as bench


def test_without_cuda_says_so_and_returns(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == {}
    assert "no CUDA device on this machine" in capsys.readouterr().out


@pytest.mark.interpreter
def test_smoke_run_covers_every_kernel(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the run sets it
    data = bench.main(["--smoke"])
    names = [c["case"] for c in data["cases"]]
    assert {n.split()[0] for n in names} == {"linear", "sgmv", "attention"}
    assert any("decode" in n for n in names) and any("extend" in n for n in names)
    assert all(c["triton_ms"] > 0 and c["bytes"] > 0 and c["flops"] > 0 for c in data["cases"])
    assert "of copy" in capsys.readouterr().out
