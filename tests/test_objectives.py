"""reinforce.py --method svf|lora --objective rl|nll: one loop, four trainings, on a tiny random model and
the synthetic LowByteTask of test_reinforce.py (reward +1 when the first byte is below 64)."""

import json

import pytest
import torch

import lora
import objectives
import reinforce
import svf
from logprobs import token_logprobs
from test_reinforce import LowByteTask, config, setup  # noqa: F401 (setup is a fixture)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))


class RefLowByteTask(LowByteTask):
    """LowByteTask with a reference answer: "!" (byte 33, below 64, so a correct answer) for every
    prompt but "cot", which has none, like ARC's chain-of-thought prefill."""
    prompts = {"plain": None, "cot": None}

    def reference_text(self, example):
        return "!" if self.prompt == "plain" else None


def train(setup, tmp_path, name, task=None, resume=False, **kw):
    model, tok, path = setup
    return reinforce.train(config(**kw), model, tok, path, task or RefLowByteTask(), str(tmp_path / name),
                           str(tmp_path / f"{name}.safetensors"), resume=resume)


def steps(tmp_path, name):
    return [r for r in map(json.loads, open(tmp_path / name / "log.jsonl")) if r["kind"] == "step"]


def reference_nll(setup, path, task):
    """Mean NLL per reference token of the validation questions under the expert file at `path`."""
    model, tok, model_dir = setup
    wrapper, _ = lora.load_adapter_for(model, model_dir, str(path), use_cache=False, log=lambda *a: None)
    examples = task.load("validation")
    prompts = [tok.chat(ex.messages) for ex in examples]
    targets = objectives.reference_targets(task, examples, tok)
    with torch.no_grad(), wrapper.applied():
        logp, mask = token_logprobs(model, prompts, targets, tok.pad_id)
    return -(logp.sum() / mask.sum()).item()


@pytest.mark.parametrize("method", ["svf", "lora"])
def test_nll_lowers_the_loss_of_the_reference_answers(setup, tmp_path, method):
    model = setup[0]
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    # SVF's scales move this nearly uniform tiny model more slowly than LoRA's factors: a larger lr
    kw = dict(method="lora", rank=4, lr=0.05) if method == "lora" else dict(lr=0.2)
    train(setup, tmp_path, "base", steps=1, eval_every=1, objective="nll", **dict(kw, lr=1e-9))  # ~ step 0
    best = train(setup, tmp_path, "nll", steps=30, objective="nll", **kw)
    rows = steps(tmp_path, "nll")
    assert "reward" not in rows[0] and rows[0]["tokens"] == 16 * 2  # "!" and the end-of-turn token, no rollouts
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    task = RefLowByteTask()
    before, after = (reference_nll(setup, tmp_path / f"{n}.safetensors", task) for n in ("base", "nll"))
    assert after < before - 0.5, (before, after)  # on the validation questions, with the expert file kept
    assert best["accuracy"] > 0.5 and best["step"] > 0  # learning "!" answers the bandit: best-on-validation kept it
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_weights[k]), k
    info = svf.file_info(tmp_path / "nll.safetensors")
    assert (info["config"]["method"], info["config"]["objective"]) == (method, "nll")
    wrapper = reinforce.make_wrapper(config(objective="nll", **kw), model, setup[2])
    assert info["trainable_params"] == sum(p.numel() for p in wrapper.parameters())


@pytest.mark.parametrize("method", ["svf", "lora"])
def test_rl_raises_the_reward(setup, tmp_path, method):
    kw = dict(method="lora", rank=4, lr=0.01) if method == "lora" else {}
    best = train(setup, tmp_path, "rl", task=LowByteTask(), **kw)
    r = [row["reward"] for row in steps(tmp_path, "rl")]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.5, r
    assert best["accuracy"] > 0.5
    assert isinstance(lora.load_adapter_for(setup[0], setup[2], str(tmp_path / "rl.safetensors"))[0],
                      lora.LoRA if method == "lora" else svf.SVF)


def test_nll_takes_the_mean_over_every_reference_token_of_the_batch(setup):
    model, tok, path = setup
    wrapper = lora.LoRA(model, svf.checkpoint_identity(path), "all", 2)
    with torch.no_grad():
        for B in wrapper.B:
            B.normal_()
    prompts, targets = [[1, 2, 3], [4, 5], [6]], [[7, 8], [9, 10, 11, 12], [13]]
    grads = []
    for micro in (1, 8):  # micro-batches add up to the same loss and gradient
        for p in wrapper.parameters():
            p.grad = None
        loss = objectives.nll_step(wrapper, model, prompts, targets, config(micro_batch=micro), 256)["loss"]
        grads.append([p.grad.clone() for p in wrapper.parameters()])
    with torch.no_grad():
        logp, mask = token_logprobs(model, prompts, targets, 256, lambda ids, m, **kw: wrapper(ids, m, **kw))
    assert mask.sum() == 7 and loss == pytest.approx(-logp.sum().item() / 7, rel=1e-5)  # per token, not per answer
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_lora_training_resumes_where_an_uninterrupted_run_ends(setup, tmp_path, monkeypatch):
    kw = dict(method="lora", objective="nll", rank=4, steps=6, eval_every=3)
    train(setup, tmp_path, "full", **kw)
    calls = {"n": 0}
    real = objectives.nll_step

    def interrupt_at_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(reinforce, "nll_step", interrupt_at_step_4)
    with pytest.raises(SystemExit):
        train(setup, tmp_path, "cut", **kw)
    monkeypatch.setattr(reinforce, "nll_step", real)
    with pytest.raises(SystemExit, match="rank=4/8"):  # the method's settings are part of the run
        train(setup, tmp_path, "cut", resume=True, **dict(kw, rank=8))
    with pytest.raises(SystemExit, match="objective='nll'/'rl'"):
        train(setup, tmp_path, "cut", resume=True, **dict(kw, objective="rl"))
    train(setup, tmp_path, "cut", resume=True, **kw)
    full, cut = (torch.load(tmp_path / n / "state.pt", weights_only=False) for n in ("full", "cut"))
    assert set(full["p"]) == set(lora.LoRA(setup[0], "x", "all", 4).state())  # the factors A and B
    for k in full["p"]:
        assert torch.equal(full["p"][k], cut["p"][k]), k
    assert [r["loss"] for r in steps(tmp_path, "full")] == [r["loss"] for r in steps(tmp_path, "cut")]


def test_nll_refuses_a_prompt_without_references_naming_those_that_have_them(setup, tmp_path):
    with pytest.raises(ValueError, match=r"48 of 48 lowbyte .*--prompt cot.*prompts that have them: \['plain'\]"):
        train(setup, tmp_path, "x", task=RefLowByteTask(prompt="cot"), objective="nll")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_cli_resolves_each_methods_defaults_and_refuses_contradictions(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(reinforce, "load", lambda args: (None, None, None))
    monkeypatch.setattr(reinforce, "train", lambda cfg, model, tok, model_dir, task, run_dir, out, resume:
                        seen.update(cfg=cfg, run_dir=run_dir, out=out))
    reinforce.main(["--task", "arc", "--method", "lora", "--objective", "nll"])
    cfg = seen["cfg"]
    recipe = reinforce.recipe("arc")
    assert (cfg.targets, cfg.rank, cfg.lora_alpha) == ("qv", 16, 16.0)                        # the method's
    assert (cfg.prompt, cfg.steps, cfg.batch_size) == (recipe.prompt, recipe.steps, recipe.batch_size)  # the recipe's
    assert seen["run_dir"] == "runs/arc_easy-lora-nll-qv" and seen["out"] == "runs/arc_easy-lora-nll-qv.safetensors"
    assert "--baseline and --temperature shape RL's rollouts and are not used" in capsys.readouterr().out
    reinforce.main(["--task", "arc", "--method", "lora", "--rank", "8", "--targets", "mlp"])
    assert (seen["cfg"].targets, seen["cfg"].rank, seen["cfg"].lora_alpha) == ("mlp", 8, 8.0)
    reinforce.main(["--task", "arc", "--objective", "nll"])
    assert (seen["cfg"].method, seen["cfg"].targets, seen["out"]) == ("svf", "mlp", "runs/arc_easy-svf-nll-mlp.safetensors")
    reinforce.main(["--task", "arc"])
    assert seen["out"] == "experts/arc.safetensors" and seen["run_dir"] == "runs/arc_easy-mlp"  # as before
    for flags, message in [(["--rank", "8"], "add --method lora"),
                           (["--objective", "nll", "--kl", "0.1"], "no rollouts"),
                           (["--objective", "nll", "--prompt", "official"],
                            "prompts that have them: ['letter', 'restate', 'text', 'first']")]:
        with pytest.raises(SystemExit):
            reinforce.main(["--task", "arc"] + flags)
        assert message in capsys.readouterr().err, flags
