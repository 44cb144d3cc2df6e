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


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_resident_memory_now_and_a_steps_own_peak():
    """rss_gib is the memory now, peak_rss_since_reset_gib the peak since reset_peak_rss: a freed
    256 MiB block leaves the first, raises the second until the reset, and the run's peak for good."""
    before = chat.rss_gib()
    chat.reset_peak_rss()
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    during = chat.rss_gib()
    del block
    chat.release_freed_memory()
    assert during - before > 0.2 and chat.rss_gib() < during - 0.2
    assert chat.peak_rss_since_reset_gib() >= during - 0.01 and chat.peak_rss_gib() >= during - 0.01
    if chat.reset_peak_rss():  # where /proc/self/clear_refs can be written: the step's peak starts again
        assert chat.peak_rss_since_reset_gib() < during - 0.2
    assert chat.peak_rss_gib() >= during - 0.01  # and the process's peak is kept across the reset


SHAPES = """
import chat, products, torch
dtype = torch.bfloat16 if products.native_bfloat16() else torch.float32
rss = []
for S in range(40, 300):  # 260 key lengths, 2 row counts: 1040 shapes of decoding's batched products
    for B in (16, 3):
        q, k = torch.randn(B, 9, 64, dtype=dtype), torch.randn(B, 3, S, 64, dtype=dtype)
        products.attend(q, k, k)
    if S in (80, 299):  # after 160 shapes, and after 880 more
        chat.release_freed_memory()
        rss.append(chat.rss_gib())
print((rss[1] - rss[0]) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_the_caches_of_shapes_stay_bounded():
    """torch's oneDNN caches of shapes are capped where products is imported (before any product
    runs): after 160 shapes, 880 more added 2 MiB here in bfloat16; uncapped (1024 shapes, torch's
    default), 473 MiB."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", SHAPES], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 50, out.stdout  # MiB


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
def test_a_bfloat16_expert_from_the_svd_cache_leaves_the_file_unmapped(tiny_checkpoint, tmp_path, monkeypatch):
    """The cache holds float32 factors; in bfloat16 svf converts U and Vh, and float32 sigma was
    kept as a view of the file's map, which kept all of it mapped and its pages read resident
    (0.41 GiB for SmolLM2-135M's MLP, issue 38)."""
    import gc

    import svf
    from model import load_model
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))
    path = tiny_checkpoint("llama")
    model, _ = load_model(path, dtype=torch.bfloat16)
    for _ in range(2):  # the first decomposes and writes the cache, the second reads it
        wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", log=lambda *a: None)
        gc.collect()
    cache = os.listdir(tmp_path / "cache" / "svd")
    assert len(cache) == 1 and wrapper.factors[0].U.dtype == torch.bfloat16
    assert cache[0] not in open("/proc/self/maps").read()
