"""benchmarks/gpu_check.py as a dry run on the CPU: every row runs, and a wrong result fails the command."""

import pytest
import torch

import svf
from benchmarks import gpu_check


def test_the_dry_run_on_the_cpu_passes_every_row(capsys):
    assert gpu_check.main(["--device", "cpu", "--no-tests"]) == 0
    out = capsys.readouterr().out
    for row in ("torch float32 SmolLM2 down", "torch bfloat16 odd", "logits", "greedy tokens",
                "evaluation batch", "REINFORCE step", "CEM generation", "adapt.py question", "bfloat16 step"):
        assert row in out, row
    assert "0 failed" in out and "FAIL" not in out


def test_a_wrong_recomposition_fails_the_check(monkeypatch, capsys):
    reference = svf.recompose
    monkeypatch.setattr(svf, "recompose", lambda U, s, Vh, impl="auto": reference(U, s * 1.01, Vh, impl))
    assert gpu_check.main(["--device", "cpu", "--no-tests"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "torch float32 odd" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="use --device cpu"):
        gpu_check.main(["--device", "cuda"])
