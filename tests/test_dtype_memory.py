"""Issue 38: the dtype a device runs natively chosen by itself (--dtype auto), and the run's memory
and pace said as it goes."""

import argparse
import os
import platform
import subprocess
import sys

import pytest
import torch

import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu(monkeypatch, native, features=("avx512_bf16",)):
    """Pretends this CPU does (or does not) run bfloat16 natively, with these cpuinfo flags."""
    monkeypatch.setattr(chat, "native_bfloat16", lambda: native)
    monkeypatch.setattr(chat, "bfloat16_features", lambda: list(features))


def test_every_script_defaults_to_auto():
    ap = argparse.ArgumentParser()
    chat.add_model_arguments(ap)
    assert ap.parse_args([]).dtype == "auto"
    assert ap.parse_args(["--dtype", "float32"]).dtype == "float32"


@pytest.mark.parametrize("native, features, expected, why", [
    (True, ["avx512_bf16"], "bfloat16", "this CPU has avx512_bf16"),
    (True, ["amx_bf16", "avx512_bf16"], "bfloat16", "this CPU has amx_bf16 and avx512_bf16"),
    (False, [], "float32", "no avx512_bf16 or amx_bf16"),
])
def test_auto_on_a_cpu_is_bfloat16_only_where_it_is_native(monkeypatch, capsys, native, features, expected, why):
    cpu(monkeypatch, native, features)
    args = argparse.Namespace(dtype="auto", device="cpu")
    assert chat.resolve_dtype(args) == expected == args.dtype
    said = capsys.readouterr().out
    assert said.startswith(f"dtype auto: {expected} (") and why in said
    assert chat.resolve_dtype(args) == expected and capsys.readouterr().out == ""  # said once


def test_auto_names_the_limit_that_turned_native_bfloat16_off(monkeypatch):
    cpu(monkeypatch, False, ["avx512_bf16"])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    dtype, why = chat.auto_dtype("cpu")
    assert dtype == "float32" and "turned off by ATEN_CPU_CAPABILITY=avx2" in why


@pytest.mark.parametrize("capability, expected", [((7, 5), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, why = chat.auto_dtype(torch.device("cuda", 0))
    assert dtype == expected and f"compute capability {capability[0]}.{capability[1]}" in why


@pytest.mark.parametrize("native", [True, False])
def test_load_resolves_auto_and_explicit_values_still_win(tiny_checkpoint, monkeypatch, native):
    cpu(monkeypatch, native)
    monkeypatch.setattr(chat.Tokenizer, "from_dir", lambda path: None)  # the tiny checkpoint has no tokenizer
    path = str(tiny_checkpoint("llama"))
    for given, expected in (("auto", "bfloat16" if native else "float32"), ("float32", "float32"),
                            ("bfloat16", "bfloat16")):
        model, _, _ = chat.load(argparse.Namespace(model=path, dtype=given, device="cpu"))
        assert model.lm_head.weight.dtype == getattr(torch, expected), given


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 CPU limits")
@pytest.mark.parametrize("variable, value", [("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")])
def test_an_avx2_limit_in_the_environment_means_no_native_bfloat16(variable, value):
    """A user (or a test) emulating an AVX2-only CPU with either of torch's limits gets float32."""
    env = dict(os.environ, **{variable: value})
    out = subprocess.run([sys.executable, "-c", "import products; print(products.native_bfloat16())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
