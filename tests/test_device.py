"""Every tensor lives on the model's device: --device, and the calls that must not create tensors elsewhere.

Without a GPU the check is this: with torch.set_default_device("meta") in force, a tensor created
without an explicit device lands on `meta`, where it holds no data, and the call fails as soon as it
is mixed with the model's CPU tensors or read. So a call that passes here creates every tensor on
the device it means (the model's, or the CPU on purpose), and would do the same on a GPU.
"""

import argparse

import pytest
import torch

import adapt
import cem
import chat
import objectives
import reinforce
import svf
from chat import Completer
from generate import generate
from logprobs import token_logprobs
from model import load_model
from test_adapt import config as adapt_config, stub_classify
from test_cem import LowByteTask as ShotTask
from test_reinforce import LowByteTask, byte_tokenizer

quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture
def on_meta():
    """torch.set_default_device("meta") for the test's duration: device-less tensors land on meta."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def setup(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama", vocab_size=259)
    model, _ = load_model(path)
    return model, byte_tokenizer(), path


def test_the_meta_default_device_catches_a_tensor_made_without_a_device(setup, on_meta):
    """The check itself: a tensor made as the old left_pad made it (torch.full without a device, then
    .to(device)) lands on meta and cannot reach the model."""
    model, tok, _ = setup
    ids = torch.full((1, 3), 0, dtype=torch.long)  # what the old code did
    with pytest.raises((NotImplementedError, RuntimeError)):
        model(ids.to("cpu"))


def test_generation_and_logprobs_make_their_tensors_on_the_models_device(setup, on_meta):
    model, tok, _ = setup
    prompts = [[1, 2, 3, 4], [5, 6]]
    g = torch.Generator(device="cpu").manual_seed(0)
    out = generate(model, prompts, 5, temperature=0.8, top_p=0.9, stop_tokens=(258,), pad_id=256, generator=g)
    assert len(out) == 2 and all(len(o) <= 5 for o in out)
    assert Completer(model, tok, max_new_tokens=3)([[{"role": "user", "content": "hi"}]])[0] is not None
    logp, mask, kl = token_logprobs(model, prompts, [[7, 8], [9]], 256, temperature=0.8, kl=True)
    assert logp.device.type == mask.device.type == kl.device.type == "cpu"
    assert torch.isfinite(logp).all() and mask.sum().item() == 3


def test_one_reinforce_step_makes_its_tensors_on_the_models_device(setup, tmp_path, on_meta):
    model, tok, path = setup
    cfg = reinforce.TrainConfig(task="lowbyte", targets="all", batch_size=8, micro_batch=4, max_new_tokens=2,
                                samples=2, temperature=1.0, baseline=True, kl=0.1)
    wrapper = reinforce.make_wrapper(cfg, model, path)  # the SVD, the factors and p, under meta
    task = LowByteTask()
    batch = task.load("train")[:8]
    completer = Completer(model, tok, 2, cfg.temperature, batch_size=8)
    row = reinforce.rollouts_and_gradient(wrapper, model, tok, completer, task, batch, cfg)
    assert set(row) >= {"reward", "loss", "kl"}
    grads = [p.grad for p in wrapper.parameters()]
    assert all(g is not None and g.device.type == "cpu" and torch.isfinite(g).all() for g in grads)
    assert objectives.advantages([1.0, -1.0], True, 2).device.type == "cpu"


def test_a_cem_generation_and_an_adapt_pass_make_their_tensors_on_the_models_device(setup, tmp_path, on_meta):
    model, tok, path = setup
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=quiet)
    paths = {}
    for k, c in enumerate(["code", "math", "reasoning", "cls"]):
        g = torch.Generator(device="cpu").manual_seed(k)
        p = {n: 2 * torch.randn(len(f.sigma), generator=g, device="cpu")
             for n, f in zip(wrapper.names, wrapper.factors)}
        paths[c] = str(tmp_path / f"{c}.safetensors")
        wrapper.save_expert(paths[c], p, task=c)

    # one CEM generation of a population of 3 over the three task experts, scored on 4 shots
    task = ShotTask()
    experts = [wrapper.load_expert(paths[c]) for c in ("code", "math", "reasoning")]
    completer = Completer(model, tok, 2, batch_size=4)
    fitness = cem.ShotFitness(wrapper, experts, task, task.load("test")[:4], completer)
    result = cem.cem(fitness, 3, population=3, generations=1, init_mean=1 / 3, seed=0, log=quiet)
    assert result.best.shape == (3,) and len(result.history) == 1
    mix = str(tmp_path / "mix.safetensors")
    cem.save_mix(wrapper, mix, experts, result.best, task="lowbyte", shots=dict(ids=[]))

    # two-pass adaptation: pass 1 routes (classification expert applied), pass 2 answers under W'
    for strategy, extra in (("cls", {}), ("fewshot", {"fewshot": mix})):
        adapter = adapt.Adapter(model, tok, path, adapt_config(paths, strategy=strategy, **extra),
                                classify=stub_classify, log=quiet, use_cache=False)
        questions = ["q-math", "q-code"]
        choices = adapter.choose(questions)
        prompts = [completer.encode([{"role": "user", "content": q}]) for q in questions]
        out = adapter.answer(prompts, choices, completer)
        assert len(out) == 2


def test_device_flag_resolves_and_refuses_what_the_machine_lacks():
    assert chat.resolve_device("cpu") == torch.device("cpu")
    assert chat.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        chat.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --device cpu"):
            chat.resolve_device("cuda:0")
    ap = argparse.ArgumentParser()
    chat.add_model_arguments(ap)
    assert ap.parse_args([]).device == "auto" and ap.parse_args(["--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        ap.parse_args(["--device", "gpu0"])


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_native_kernels_is_warned_of(tiny_checkpoint, monkeypatch, native):
    """chat.load, which every script loads through: bfloat16 on a CPU whose products fall back to
    generic loops (no AVX-512-BF16 or AMX) says that float32 is the faster; nothing else is warned of."""
    import warnings
    monkeypatch.setattr(chat, "native_bfloat16", lambda: native)
    monkeypatch.setattr(chat.Tokenizer, "from_dir", lambda path: None)  # the tiny checkpoint has no tokenizer
    path = tiny_checkpoint("llama")
    for dtype in ("float32", "bfloat16"):
        args = argparse.Namespace(model=str(path), dtype=dtype, device="cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _, _ = chat.load(args)
        assert model.lm_head.weight.dtype == getattr(torch, dtype)  # loaded either way
        said = [str(w.message) for w in caught if "native bfloat16" in str(w.message)]
        assert len(said) == (dtype == "bfloat16" and not native)
        assert all("--dtype float32 is the faster" in s for s in said)


def test_factors_follow_the_models_dtype_and_their_memory_is_said(setup, capsys):
    model, _, path = setup
    model.to(torch.bfloat16)
    said = []
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=said.append)
    assert all(f.U.dtype == f.Vh.dtype == torch.bfloat16 and f.sigma.dtype == torch.float32 for f in wrapper.factors)
    assert all(p.dtype == torch.float32 for p in wrapper.parameters())  # p, and so Adam and the loss, in float32
    weights = {n: model.get_parameter(n) for n in wrapper.names}
    expected = sum(min(W.shape) * ((W.shape[0] + W.shape[1]) * 2 + 4) for W in weights.values())
    assert svf.factor_bytes(weights, torch.bfloat16) == expected
    assert any("the factors of 6 matrices take" in s for s in said)
    assert any("recomposition by the PyTorch reference" in s for s in said)  # CPU tensors: the reference
    W = wrapper.weights()[wrapper.names[0]]
    assert W.dtype == torch.bfloat16


def test_a_gpu_that_cannot_hold_the_factors_is_refused_before_decomposing(setup, monkeypatch):
    model, _, path = setup
    weights = {n: model.get_parameter(n) for n in svf.target_names(model, "mlp")}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    with pytest.raises(MemoryError, match=r"free: use --dtype bfloat16"):
        svf.check_factor_memory(weights, torch.float32, torch.device("cuda", 0), log=quiet)
    assert svf.check_factor_memory(weights, torch.float32, torch.device("cpu"), log=quiet) > 0


def test_a_run_sampled_on_one_device_resumes_only_on_that_device(setup, tmp_path, monkeypatch):
    model, tok, path = setup
    cfg = reinforce.TrainConfig(task="lowbyte", targets="mlp", steps=1, batch_size=8, max_new_tokens=1,
                                eval_every=1, eval_limit=4)
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "e.safetensors")
    reinforce.train(cfg, model, tok, path, LowByteTask(), run_dir, out)
    state = torch.load(f"{run_dir}/state.pt", weights_only=False)
    assert state["generator_device"] == "cpu"
    state["generator_device"] = "cuda"  # as a GPU run would have written it
    torch.save(state, f"{run_dir}/state.pt")
    with pytest.raises(SystemExit, match="resume it with --device cuda"):
        reinforce.train(cfg, model, tok, path, LowByteTask(), run_dir, out, resume=True)
