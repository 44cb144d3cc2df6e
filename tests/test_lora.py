"""lora.py: LoRA at initialisation, the training and inference paths, LoRA files and their refusal,
and load_adapter_for telling SVF and LoRA files apart, on tiny random models."""

import pytest
import torch

import lora
import params
import safetensors_io
import svf
from model import load_model

quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))  # tests leave the user's cache alone


@pytest.fixture
def tiny(tiny_checkpoint):
    """Factory: tiny(kind, targets, rank, seed, dtype) -> (model, LoRA, checkpoint dir)."""
    def make(kind="llama", targets="qv", rank=4, seed=0, dtype=torch.float32, **kw):
        path = tiny_checkpoint(kind, seed=seed)
        model, _ = load_model(path, dtype=dtype)
        return model, lora.LoRA(model, svf.checkpoint_identity(path), targets, rank, **kw), path
    return make


def randomise(wrapper, seed=1):
    """Gives every B (zero at initialisation) and A random values, so that W' differs from W."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapper.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind, targets, dtype", [("llama", "qv", torch.float32), ("qwen2", "all", torch.float32),
                                                  ("llama3", "mlp", torch.bfloat16)])
def test_lora_at_initialisation_leaves_the_outputs_unchanged(tiny, kind, targets, dtype):
    model, s, _ = tiny(kind, targets, dtype=dtype)
    ids = torch.randint(0, 89, (2, 7))
    with torch.no_grad():
        base = model(ids)
        assert torch.equal(s(ids), base)  # B = 0: W' is W bit for bit, in float32 and bfloat16 alike
        with s.applied():
            assert torch.equal(model(ids), base)
    for name, W in s.weights().items():
        assert torch.equal(W, model.get_parameter(name)) and W.dtype == dtype, name
    assert all(not B.any() for B in s.B) and all(A.std() > 0 for A in s.A)


def test_targets_rank_and_the_paper_baseline(tiny):
    model, s, _ = tiny(targets="qv", rank=16)
    assert s.names == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"]
    assert s.alpha == 16.0 and s.scaling == 1.0  # alpha = r by default (Hu et al.)
    shapes = [(tuple(A.shape), tuple(B.shape)) for A, B in zip(s.A, s.B)]
    assert shapes == [((16, 48), (48, 16)), ((16, 48), (16, 16))] * 2  # A (r, n), B (m, r); v is (2 heads * 8, 48)
    assert torch.allclose(torch.cat([A.flatten() for A in s.A]).std(), torch.tensor(1 / 16), rtol=0.1)
    again = lora.LoRA(model, s.identity, "qv", 16)
    assert all(torch.equal(a, b) for a, b in zip(s.A, again.A))  # seeded
    assert not torch.equal(lora.LoRA(model, s.identity, "qv", 16, seed=1).A[0], s.A[0])
    with pytest.raises(ValueError, match="rank=0"):
        lora.LoRA(model, s.identity, "qv", 0)


def test_weights_are_W_plus_alpha_over_r_B_A(tiny):
    model, s, _ = tiny(targets="all", rank=3, alpha=7.5)
    randomise(s)
    for (name, Wp), A, B in zip(s.weights().items(), s.A, s.B):
        torch.testing.assert_close(Wp, model.get_parameter(name) + 2.5 * B @ A)


def test_a_training_step_changes_only_A_and_B(tiny):
    model, s, _ = tiny(targets="all")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert [n for n, _ in s.named_parameters()] == [f"{ab}.{i}" for ab in "AB" for i in range(len(s.names))]
    opt = torch.optim.Adam(s.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 9))
    for _ in range(2):  # at B = 0 the gradient reaches B only; from the second step on, A too
        opt.zero_grad()
        torch.nn.functional.cross_entropy(s(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(B.any() for B in s.B)
    assert not torch.equal(s.A[0], lora.LoRA(model, s.identity, "all", 4).A[0])


def test_the_swap_restores_the_weights_bit_exactly(tiny):
    model, s, _ = tiny(targets="all")
    params_ = dict(model.named_parameters())
    before = {k: (v.clone(), v.data_ptr()) for k, v in params_.items()}
    randomise(s)
    ids = torch.randint(0, 97, (1, 8))
    fresh = lora.LoRA(model, s.identity, "all", 4)  # B = 0
    with torch.no_grad():
        base, trained = model(ids), s(ids)
        with s.applied() as m:
            swapped = m(ids)
            assert torch.equal(s.weights()[s.names[0]], model.get_parameter(s.names[0]))  # built on the base W
            with fresh.applied():
                assert torch.equal(model(ids), base)  # nested, B = 0
            again = model(ids)
        with pytest.raises(RuntimeError), s.applied():
            raise RuntimeError("interrupted generation")
    torch.testing.assert_close(swapped, trained)  # training and inference paths agree
    assert torch.equal(swapped, again) and not torch.allclose(swapped, base)
    for k, v in params_.items():
        assert torch.equal(v, before[k][0]) and v.data_ptr() == before[k][1], f"{k} not restored"
    assert torch.equal(model(ids), base)


def test_lora_file_round_trip(tiny, tmp_path):
    model, s, _ = tiny(targets="mlp", rank=2, alpha=4.0)
    randomise(s)
    path = tmp_path / "experts" / "arc-lora.safetensors"
    s.save_expert(path, task="arc", steps=3, config={"method": "lora"})
    _, meta, _ = safetensors_io.read_header(path)
    assert (meta["format"], meta["targets"], meta["rank"], meta["alpha"]) == (lora.LORA_FORMAT, "mlp", "2", "4.0")
    assert meta["checkpoint"] == s.identity and svf.file_info(path)["config"] == {"method": "lora"}
    expert = s.load_expert(path)
    for k, t in s.state().items():
        assert torch.equal(expert.p[k], t), k
    fresh = lora.LoRA(model, s.identity, "mlp", 2, alpha=4.0, seed=5)
    fresh.load_state(expert.p)
    for name, W in fresh.weights().items():
        assert torch.equal(W, s.weights()[name])
        assert torch.equal(W, s.weights(expert.p)[name])  # weights() of a loaded file's factors


def test_a_mismatched_lora_file_is_refused_naming_the_mismatch(tiny, tmp_path):
    model, s, path = tiny(targets="qv", rank=4)
    file = str(tmp_path / "qv4.safetensors")
    s.save_expert(file, task="arc")
    for other, message in [(lora.LoRA(model, s.identity, "qv", 8), "rank: the file has 4, this wrapper 8"),
                           (lora.LoRA(model, s.identity, "mlp", 4), "targets: the file has 'qv', this wrapper 'mlp'"),
                           (lora.LoRA(model, s.identity, "qv", 4, alpha=8), "alpha: the file has 4.0, this wrapper 8.0")]:
        with pytest.raises(svf.ExpertMismatch, match=message):
            other.load_expert(file)
    other_model, other, _ = tiny(targets="qv", rank=4, seed=1)  # same architecture, other weights
    with pytest.raises(svf.ExpertMismatch, match=f"checkpoint: trained for {s.identity}, this model is {other.identity}"):
        other.load_expert(file)
    tensors, meta = safetensors_io.load(file)  # right metadata, wrong shapes
    key = lora.factor_keys(s.names[0])[0]
    safetensors_io.save(file, dict(tensors, **{key: torch.zeros(4, 3)}), meta)
    with pytest.raises(svf.ExpertMismatch, match=r"shapes .*lora_A', \(4, 3\)"):
        s.load_expert(file)
    svf.SVF(model, s.identity, "qv", use_cache=False, log=quiet).save_expert(file)
    with pytest.raises(svf.ExpertMismatch, match="is an SVF expert file, not a LoRA file"):
        s.load_expert(file)
    safetensors_io.save(file, {"x": torch.zeros(3)}, {"format": "pt"})
    with pytest.raises(svf.ExpertMismatch, match="is it a LoRA file"):
        s.load_expert(file)


def test_load_adapter_for_tells_svf_and_lora_files_apart(tiny, tmp_path):
    model, s, path = tiny(targets="all", rank=3, alpha=6.0)
    randomise(s)
    lora_file, svf_file = str(tmp_path / "lora.safetensors"), str(tmp_path / "svf.safetensors")
    s.save_expert(lora_file, task="arc")
    sv = svf.SVF(model, s.identity, "mlp", use_cache=False, log=quiet)
    with torch.no_grad():
        for p in sv.p:
            p.normal_()
    sv.save_expert(svf_file, task="gsm8k")
    ids = torch.randint(0, 97, (1, 6))

    wrapper, expert = lora.load_adapter_for(model, path, lora_file)
    assert isinstance(wrapper, lora.LoRA) and (wrapper.targets, wrapper.rank, wrapper.alpha) == ("all", 3, 6.0)
    assert expert.info == {"task": "arc"}
    with torch.no_grad(), wrapper.applied():  # the file's factors are loaded: applied() applies them
        torch.testing.assert_close(model(ids), s(ids), rtol=0, atol=0)

    wrapper, expert = lora.load_adapter_for(model, path, svf_file, use_cache=False, log=quiet)
    assert isinstance(wrapper, svf.SVF) and wrapper.targets == "mlp" and expert.info == {"task": "gsm8k"}
    with torch.no_grad(), wrapper.applied():
        torch.testing.assert_close(model(ids), sv(ids))

    safetensors_io.save(lora_file, {"x": torch.zeros(3)}, {"format": "pt"})
    with pytest.raises(svf.ExpertMismatch, match="expected an SVF expert .* or a LoRA file"):
        lora.load_adapter_for(model, path, lora_file)
    with pytest.raises(FileNotFoundError, match="train one with reinforce.py"):
        lora.load_adapter_for(model, path, str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3"])
def test_the_wrappers_train_as_many_parameters_as_params_py_counts(tiny_checkpoint, kind):
    import json
    path = tiny_checkpoint(kind)
    cfg = json.load(open(f"{path}/config.json"))
    model, _ = load_model(path)
    identity = svf.checkpoint_identity(path)
    for targets in ("qv", "mlp", "all"):
        n = sum(p.numel() for p in lora.LoRA(model, identity, targets, 4).parameters())
        assert n == params.count(cfg, "lora", targets, 4), (kind, targets)
        n = sum(p.numel() for p in svf.SVF(model, identity, targets, use_cache=False, log=quiet).parameters())
        assert n == params.count(cfg, "svf", targets), (kind, targets)
    assert sum(p.numel() for p in model.parameters()) == params.count(cfg, "full"), kind


def test_evaluate_model_applies_a_lora_file(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """evaluate_model.py --expert takes a LoRA file where it took an SVF expert, and --compare pairs
    the items with a saved run (chat.py's model loading and data/'s task stubbed)."""
    import chat
    import evaluate_model
    from test_reinforce import LowByteTask, byte_tokenizer
    path = tiny_checkpoint("llama", vocab_size=259)
    model, _ = load_model(path)
    tok = byte_tokenizer()
    s = lora.LoRA(model, svf.checkpoint_identity(path), "all", 2)
    randomise(s)
    file = str(tmp_path / "lora.safetensors")
    s.save_expert(file, task="lowbyte", prompt="plain")
    monkeypatch.setattr(evaluate_model, "load", lambda args: (model, tok, path))
    for module in (evaluate_model, chat):
        monkeypatch.setattr(module, "get_task", lambda name, prompt=None, data_dir=None: LowByteTask(prompt=prompt))
    run = lambda *flags: evaluate_model.main(["--task", "lowbyte", "--split", "validation", "--model", path,
                                              "--max-new-tokens", "3", *flags])
    base_file = str(tmp_path / "base.json")
    base, adapted = run("--out", base_file), run("--expert", file, "--compare", base_file)
    prompts = [chat.Completer(model, tok).encode(ex.messages) for ex in LowByteTask().load("validation")]
    with s.applied():
        want = [tok.decode(ids) for ids in chat.Completer(model, tok, 3).generate_ids(prompts)]
    assert [r.output for r in adapted.records] == want != [r.output for r in base.records]
    diff = adapted.accuracy - base.accuracy
    out = capsys.readouterr().out
    assert f"vs {base_file}: {diff:+.4f} (95% CI" in out and "on 16 shared items" in out
