"""Two-pass inference on a tiny random model: routing, weights in each pass, the few-shot mix, errors, the CLI."""

import json

import pytest
import torch

import adapt
import cem
import lora
import svf
from data.task import Example, Task
from chat import Completer
from model import load_model
from test_cem import byte_tokenizer

quiet = lambda *a, **k: None  # noqa: E731
QUESTIONS = {"code": "q-code", "math": "q-math", "reasoning": "q-reasoning", "other": "q-other"}


def stub_classify(problems):
    """Reads the category off the question text; "q-junk" gets a label that is no category."""
    return [p.split("-")[1] if p != "q-junk" else "banana" for p in problems]


class SpyCompleter(Completer):
    """Records, for each generation call, the prompts' text and the model's targeted weights."""

    def __init__(self, model, tok, names):
        super().__init__(model, tok, max_new_tokens=2, batch_size=2)
        self.names, self.calls = names, []

    def generate_ids(self, prompts):
        weights = {n: self.model.get_parameter(n).detach() for n in self.names}
        self.calls.append(([self.tok.decode(p) for p in prompts], weights))
        return super().generate_ids(prompts)


@pytest.fixture
def setup(tiny_checkpoint, tmp_path):
    """(model, tokenizer, model dir, {category: expert path}) with random experts on the MLP."""
    path = tiny_checkpoint("llama", vocab_size=259)
    model, _ = load_model(path)
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=quiet)
    paths = {}
    for k, c in enumerate(["code", "math", "reasoning", "cls"]):
        g = torch.Generator().manual_seed(k)
        p = {n: 2 * torch.randn(len(f.sigma), generator=g) for n, f in zip(wrapper.names, wrapper.factors)}
        paths[c] = str(tmp_path / f"{c}.safetensors")
        wrapper.save_expert(paths[c], p, task=c)
    return model, byte_tokenizer(), path, paths


def config(paths, **kw):
    files = dict(code_expert=paths["code"], math_expert=paths["math"], reasoning_expert=paths["reasoning"],
                 cls_expert=paths["cls"])
    return adapt.AdaptConfig(**{**files, "batch_size": 2, **kw})


def base_tensors(model, names):
    return {n: model.get_parameter(n).data for n in names}


def assert_restored(model, base):
    for n, W in base.items():  # the very same memory, and bit-equal values
        P = model.get_parameter(n)
        assert P.data_ptr() == W.data_ptr() and torch.equal(P.detach(), W), n


def test_each_category_reaches_its_expert_and_other_gets_the_base_weights(setup):
    model, tok, path, paths = setup
    adapter = adapt.Adapter(model, tok, path, config(paths, strategy="prompt"), classify=stub_classify,
                            log=quiet, use_cache=False)
    names = adapter.wrapper.names
    base = {n: W.clone() for n, W in base_tensors(model, names).items()}
    originals = base_tensors(model, names)
    expected = {c: adapter.wrapper.weights(adapter.wrapper.scales(adapter.wrapper.load_expert(paths[c]).p))
                for c in ("code", "math", "reasoning")}
    questions = ["q-math", "q-other", "q-code", "q-junk", "q-reasoning", "q-code"]
    choices = adapter.choose(questions)
    assert choices == ["math", "other", "code", "other", "reasoning", "code"]
    spy = SpyCompleter(model, tok, names)
    adapter.answer([spy.encode([{"role": "user", "content": q}]) for q in questions], choices, spy)
    seen = set()
    for texts, weights in spy.calls:  # groups in the order code, math, reasoning, other
        (category,) = {next((c for c, q in QUESTIONS.items() if q in t), "other") for t in texts}
        want = base if category == "other" else expected[category]  # "other" comes last: restored before
        for n in names:
            assert torch.equal(weights[n], want[n]), (category, n)
        seen.add(category)
    assert_restored(model, originals)
    assert seen == {"code", "math", "reasoning", "other"}
    assert adapter.timing["switches"] == 3  # "other" needs no swap


def test_cls_strategy_applies_the_classification_expert_in_pass_1(setup):
    model, tok, path, paths = setup
    seen = []

    def classify(problems):
        seen.append({n: model.get_parameter(n).detach() for n in adapter.wrapper.names})
        return stub_classify(problems)

    adapter = adapt.Adapter(model, tok, path, config(paths, strategy="cls"), classify=classify, log=quiet,
                            use_cache=False)
    originals = base_tensors(model, adapter.wrapper.names)
    assert adapter.choose(["q-reasoning", "q-code"]) == ["reasoning", "code"]
    cls_weights = adapter.wrapper.weights(adapter.wrapper.scales(adapter.wrapper.load_expert(paths["cls"]).p))
    for n in adapter.wrapper.names:
        assert torch.equal(seen[0][n], cls_weights[n]) and not torch.equal(seen[0][n], originals[n])
    assert_restored(model, originals)


def test_fewshot_weights_are_the_alpha_mix_of_the_experts(setup, tmp_path):
    model, tok, path, paths = setup
    components = [paths[c] for c in ("reasoning", "math", "code")]
    wrapper, experts = cem.load_experts(model, path, components, log=quiet, use_cache=False)
    alpha = torch.tensor([0.6, 0.1, 0.3])
    mix = str(tmp_path / "fewshot.safetensors")
    cem.save_mix(wrapper, mix, experts, alpha, task="lowbyte", shots=dict(ids=[]))
    adapter = adapt.Adapter(model, tok, path, config(paths, strategy="fewshot", fewshot=mix), log=quiet,
                            use_cache=False)
    assert adapter.choose(["anything", "q-code"]) == ["fewshot", "fewshot"]
    spy = SpyCompleter(model, tok, adapter.wrapper.names)
    originals = base_tensors(model, adapter.wrapper.names)
    adapter.answer([spy.encode([{"role": "user", "content": "hi"}])], ["fewshot"], spy)
    w = adapter.wrapper
    want = w.weights(w.mix([w.load_expert(p) for p in components], alpha))
    stored = w.weights(w.scales(w.load_expert(mix).p))  # the mix as a plain expert file: the same W'
    for n in w.names:
        assert torch.equal(spy.calls[0][1][n], want[n]), n
        torch.testing.assert_close(stored[n], want[n], rtol=1e-4, atol=1e-5)
        assert not torch.equal(want[n], w.weights(w.scales(experts[0].p))[n])  # not just one expert
    assert_restored(model, originals)


def test_experts_with_other_targets_or_for_another_model_are_refused(setup, tiny_checkpoint, tmp_path):
    model, tok, path, paths = setup
    attn = svf.SVF(model, svf.checkpoint_identity(path), "attn", use_cache=False, log=quiet)
    attn.save_expert(str(tmp_path / "attn.safetensors"))
    other_path = tiny_checkpoint("llama", vocab_size=259, seed=1)
    other = svf.SVF(load_model(other_path)[0], svf.checkpoint_identity(other_path), "mlp", use_cache=False, log=quiet)
    other.save_expert(str(tmp_path / "other.safetensors"))
    with pytest.raises(svf.ExpertMismatch, match="must adapt the same matrices"):
        adapt.Adapter(model, tok, path, config(paths, math_expert=str(tmp_path / "attn.safetensors")), log=quiet,
                      use_cache=False)
    with pytest.raises(svf.ExpertMismatch, match="trained for checkpoint"):
        adapt.Adapter(model, tok, path, config(paths, code_expert=str(tmp_path / "other.safetensors")), log=quiet,
                      use_cache=False)


def test_strategy_expert_applies_a_lora_file_and_the_mixing_strategies_refuse_one(setup, tmp_path):
    model, tok, path, paths = setup
    adapter_lora = lora.LoRA(model, svf.checkpoint_identity(path), "qv", 2)
    with torch.no_grad():
        for B in adapter_lora.B:
            B.normal_()
    file = str(tmp_path / "lora.safetensors")
    adapter_lora.save_expert(file, task="arc")
    want = adapter_lora.weights()
    adapter = adapt.Adapter(model, tok, path, config(paths, strategy="expert", expert=file), log=quiet)
    assert isinstance(adapter.wrapper, lora.LoRA) and adapter.choose(["q-code"]) == ["expert"]
    spy = SpyCompleter(model, tok, adapter_lora.names)
    originals = base_tensors(model, adapter_lora.names)
    adapter.answer([spy.encode([{"role": "user", "content": "hi"}])], ["expert"], spy)
    for n in adapter_lora.names:
        assert torch.equal(spy.calls[0][1][n], want[n]) and not torch.equal(want[n], originals[n]), n
    assert_restored(model, originals)
    assert adapter.timing["switches"] == 1
    svf_adapter = adapt.Adapter(model, tok, path, config(paths, strategy="expert", expert=paths["math"]), log=quiet,
                                use_cache=False)  # an SVF file still works there
    assert isinstance(svf_adapter.wrapper, svf.SVF) and svf_adapter.wrapper.targets == "mlp"
    with pytest.raises(svf.ExpertMismatch, match="is a LoRA file: mixing experts or routing between them"):
        adapt.Adapter(model, tok, path, config(paths, strategy="prompt", math_expert=file), log=quiet, use_cache=False)


class TwoCategoryTask(Task):
    """Questions "q-math"/"q-code" whose correct answer is any output (scoring is not the point here)."""
    name, splits, prompts, default_prompt = "mixed", ("test",), {"plain": None}, "plain"

    def load(self, split):
        return [Example(f"mixed/{i}", f"q-{c}", [{"role": "user", "content": f"q-{c} {i}"}], c)
                for i, c in enumerate(["math", "code", "math", "math", "other", "code"])]

    def extract(self, output, example=None):
        return output

    def is_correct(self, answer, example):
        return example.answer != "code"


def test_evaluation_reports_accuracy_routing_and_times(setup):
    model, tok, path, paths = setup
    adapter = adapt.Adapter(model, tok, path, config(paths, strategy="prompt"), classify=stub_classify, log=quiet,
                            use_cache=False)
    task = TwoCategoryTask()
    completer = Completer(model, tok, max_new_tokens=2, batch_size=2)
    result, confusion, choices = adapt.evaluate(adapter, task, task.load("test"), completer, "test",
                                                category="math", log=quiet)
    assert result.n == 6 and result.accuracy == 4 / 6 and result.split == "test"
    assert confusion == {("math", "math"): 3, ("math", "code"): 2, ("math", "other"): 1}
    assert adapter.timing["pass1_s"] > 0 and adapter.timing["pass2_s"] > 0 and adapter.timing["switches"] == 2
    lines = []
    adapt.report(adapter, confusion, 6, log=lines.append)
    text = "\n".join(lines)
    assert "routing accuracy 0.5000 (3/6)" in text and "swap in + out" in text and "pass 1" in text


def test_cli_errors_are_clear(capsys, tmp_path):
    cases = [(["--strategy", "magic", "--question", "x"], "invalid choice: 'magic'"),
             (["--question", "x", "--code-expert", str(tmp_path / "nope.safetensors")],
              "nope.safetensors: no such file (make it with python reinforce.py --task mbpp"),
             (["--strategy", "expert", "--question", "x"], "needs --expert FILE"),
             (["--strategy", "fewshot", "--question", "x"], "needs --fewshot FILE"),
             (["--strategy", "base", "--task", "cls"], "add --classify-only"),
             (["--strategy", "base"], "one of the arguments --question --task is required")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            adapt.main(argv)
        assert message in capsys.readouterr().err, argv


def test_classify_only_needs_no_pass_2_experts(tmp_path, monkeypatch):
    class Loaded(Exception):
        pass

    def load(args):
        raise Loaded  # reached only when the file checks passed

    monkeypatch.setattr(adapt, "load", load)
    monkeypatch.setattr(adapt, "get_task", lambda name, prompt=None, data_dir=None: TwoCategoryTask())
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(Loaded):
        adapt.main(["--task", "mixed", "--classify-only", "--code-expert", missing, "--math-expert", missing])


def test_cli_leaves_out_the_shots_and_compares_item_by_item(setup, tmp_path, monkeypatch, capsys):
    model, tok, path, paths = setup
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(adapt, "load", lambda args: (model, tok, path))
    monkeypatch.setattr(adapt, "get_task", lambda name, prompt=None, data_dir=None: TwoCategoryTask())
    wrapper, experts = cem.load_experts(model, path, [paths["math"], paths["code"]], log=quiet, use_cache=False)
    mix = str(tmp_path / "fewshot.safetensors")
    cem.save_mix(wrapper, mix, experts, torch.tensor([0.5, 0.5]), task="mixed", prompt="plain",
                 shots=dict(ids=["mixed/0", "mixed/4"]))
    base_out, out = str(tmp_path / "base.json"), str(tmp_path / "fewshot.json")
    adapt.main(["--strategy", "base", "--task", "mixed", "--exclude-shots", mix, "--out", base_out])
    adapt.main(["--strategy", "fewshot", "--task", "mixed", "--fewshot", mix, "--out", out, "--compare", base_out])
    printed = capsys.readouterr().out
    assert "left out 2 items that cem.py used as shots" in printed and "on 4 shared items" in printed
    saved = json.load(open(out))
    assert [r["id"] for r in saved["records"]] == ["mixed/1", "mixed/2", "mixed/3", "mixed/5"]
    assert {r["choice"] for r in saved["records"]} == {"fewshot"} and saved["strategy"] == "fewshot"
    with pytest.raises(SystemExit, match="searched for task mixed, not"):
        adapt.shot_ids(mix, "arc_challenge")
    # A mix and --exclude-shots of another search: the shots of both are left out, counted once.
    other = str(tmp_path / "other.safetensors")
    cem.save_mix(wrapper, other, experts, torch.tensor([1.0, 0.0]), task="mixed", prompt="plain",
                 shots=dict(ids=["mixed/1", "mixed/4"]))
    adapt.main(["--strategy", "fewshot", "--task", "mixed", "--fewshot", mix, "--exclude-shots", other, "--out", out])
    assert "left out 3 items that cem.py used as shots" in capsys.readouterr().out
    assert [r["id"] for r in json.load(open(out))["records"]] == ["mixed/2", "mixed/3", "mixed/5"]
    # A mix searched with another prompt is refused: its alpha was fitted to that prompt's outputs.
    cem.save_mix(wrapper, other, experts, torch.tensor([1.0, 0.0]), task="mixed", prompt="letter",
                 shots=dict(ids=["mixed/1"]))
    with pytest.raises(SystemExit):
        adapt.main(["--strategy", "fewshot", "--task", "mixed", "--fewshot", other])
    assert "was searched with --prompt letter, and this run uses --prompt plain" in capsys.readouterr().err


def test_classify_only_writes_the_routing_to_out(setup, tmp_path, monkeypatch):
    model, tok, path, paths = setup
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(adapt, "load", lambda args: (model, tok, path))
    monkeypatch.setattr(adapt, "get_task", lambda name, prompt=None, data_dir=None: TwoCategoryTask())
    monkeypatch.setattr(adapt.Adapter, "classify_with_model", lambda self, problems: stub_classify(problems))
    out = tmp_path / "routing.json"
    adapt.main(["--strategy", "prompt", "--task", "mixed", "--classify-only", "--out", str(out)])
    saved = json.load(open(out))
    assert saved["strategy"] == "prompt" and saved["n"] == 6 and "records" not in saved
    assert {(c["true"], c["chosen"]): c["n"] for c in saved["confusion"]} == {
        ("other", "math"): 3, ("other", "code"): 2, ("other", "other"): 1}   # the task's category is "other"
    assert [c["choice"] for c in saved["choices"]] == ["math", "code", "math", "math", "other", "code"]
