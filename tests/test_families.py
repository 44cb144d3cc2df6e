"""Every model family end to end, as a user runs it: a tiny random checkpoint of each with the real
tokenizer files, through model.py, reinforce.py, evaluate_model.py, cem.py and adapt.py.

The checkpoints are written here, into a temporary directory: a config.json like the real one of
each family (its model_type, vocabulary size, RoPE, biases, tied head and sliding window as the
real file has them; the dimensions tiny, 2 layers), random weights saved in bfloat16 by the
project's safetensors_io as the real ones are, and the family's real tokenizer files, copied from
../shared/tokenizers (see its README; the files are never part of the project, so the tests skip
where that folder is absent). Each command then runs as a subprocess, with the task data of
../shared/data, and the test checks what the command left behind.

The tiny models answer rubbish, so nothing here measures quality: these tests catch a family whose
config, weights, tokenizer or chat template does not make it through the scripts a user types.
tests/test_model.py checks the network's logits against a plain reference; tests/test_tokenizer*.py
the tokenizer's ids against Hugging Face's.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
TOKENIZERS = os.path.join(SHARED, "tokenizers")

# What stays the same in every family here: tiny dimensions, 2 layers, grouped-query attention.
TINY_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, hidden_act="silu", initializer_range=0.02, torch_dtype="bfloat16")

# family -> (tokenizer folder in ../shared/tokenizers, config.json as the real checkpoint writes it,
# dimensions aside)
FAMILIES = {
    # Meta-Llama-3-8B-Instruct
    "llama3": ("llama3", dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, bos_token_id=128000,
        eos_token_id=128009, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=None, attention_bias=False, attention_dropout=0.0, mlp_bias=False,
        pretraining_tp=1, tie_word_embeddings=False, use_cache=True)),
    # Llama-3.1-8B-Instruct: the llama3 RoPE scaling
    "llama3_1": ("llama3_1", dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1,
        tie_word_embeddings=False, use_cache=True)),
    # Mistral-7B-Instruct-v0.1, whose sliding window (4096 there) is made shorter than the prompts
    # here, so that the window is applied in every command
    "mistral": ("mistral-v0.1", dict(
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000, bos_token_id=1,
        eos_token_id=2, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=24, tie_word_embeddings=False, use_cache=True)),
    # Qwen2.5-0.5B-Instruct: q/k/v biases, a tied head, no sliding window (use_sliding_window false)
    "qwen2": ("qwen3", dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, bos_token_id=151643,
        eos_token_id=151645, max_position_embeddings=32768, max_window_layers=21, rms_norm_eps=1e-6,
        rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True,
        attention_dropout=0.0, use_cache=True)),
}


def write_family_checkpoint(path, family, seed=0):
    """config.json, model.safetensors (bfloat16) and the real tokenizer files of `family` in `path`."""
    import safetensors_io
    from model import ModelConfig, Transformer
    folder, real = FAMILIES[family]
    cfg = dict(real, **TINY_DIMS)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(cfg))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
             if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    os.makedirs(path, exist_ok=True)
    safetensors_io.save(os.path.join(path, "model.safetensors"), state, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(os.path.join(TOKENIZERS, folder)):
        if name.startswith("tokenizer"):
            shutil.copyfile(os.path.join(TOKENIZERS, folder, name), os.path.join(path, name))
    return str(path)


# A command costs about 4 s of CPU (most of it starting Python and torch and reading the tokenizer),
# so the 20 commands of the four families would add over a minute to the suite. By default every
# family runs model.py and reinforce.py (11 commands, with FULL_FAMILY's), and FULL_FAMILY also
# evaluate_model.py, cem.py and adapt.py; T2_ALL_FAMILIES=1 runs every command of every family.
FULL_FAMILY = "llama3"  # Meta-Llama-3-8B-Instruct, the paper's main model
ALL = os.environ.get("T2_ALL_FAMILIES", "") not in ("", "0")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, checkpoint dir, a work dir for the commands' outputs), one checkpoint a family."""
    name = request.param
    folder = os.path.join(TOKENIZERS, FAMILIES[name][0])
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} is absent: the real tokenizer files of {name} live outside the project "
                    f"(../shared/tokenizers, see its README)")
    work = tmp_path_factory.mktemp(name)
    return name, write_family_checkpoint(work / "checkpoint", name), work


def needs_all(name):
    if not ALL and name != FULL_FAMILY:
        pytest.skip(f"only {FULL_FAMILY} runs this command by default; T2_ALL_FAMILIES=1 runs every family")


def run(work, *args):
    """python args..., run from the repository as a user runs it; returns stdout and stderr together."""
    env = dict(os.environ, OMP_NUM_THREADS="1", T2_OFFLINE="1", T2_CACHE_DIR=str(work / "cache"))
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"python {' '.join(map(str, args))} exited with {p.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def expert(family):
    """One REINFORCE step on ARC-Easy (reinforce.py --steps 1): (its output, its expert file, run dir)."""
    name, path, work = family
    out = run(work, "reinforce.py", "--model", path, "--task", "arc", "--steps", "1", "--batch-size", "2",
              "--eval-limit", "2", "--heldout", "0", "--max-new-tokens", "4", "--no-baseline",
              "--run-dir", work / "run", "--out", work / "arc.safetensors")
    return out, work / "arc.safetensors", work / "run"


def test_model_py_chats(family):
    """python model.py --model DIR --prompt Hi: the prompt as the checkpoint's tokenizer and chat
    template make it, a few new tokens."""
    from tokenizer import Tokenizer
    name, path, work = family
    out = run(work, "model.py", "--model", path, "--prompt", "Hi", "--max-new-tokens", "4")
    stats = re.search(r"\[(\d+) prompt tokens, (\d+) new tokens", out)
    assert stats, out
    assert int(stats[1]) == len(Tokenizer.from_dir(path).chat([{"role": "user", "content": "Hi"}])), out
    assert int(stats[2]) <= 4


def test_reinforce_step_writes_an_expert_of_the_models_shapes(family, expert):
    import safetensors_io
    name, path, work = family
    out, expert_file, run_dir = expert
    rows = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 1 and steps[0]["new_tokens"] > 0 and steps[0]["grad_norm"] > 0, out
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 1], out
    vectors, meta = safetensors_io.load(str(expert_file))
    mlp = [f"model.layers.{i}.mlp.{m}_proj.weight" for i in range(2) for m in ("gate", "up", "down")]
    assert sorted(vectors) == sorted(mlp)  # one vector of singular-value scales per MLP matrix
    assert all(v.shape == (min(TINY_DIMS["hidden_size"], TINY_DIMS["intermediate_size"]),) for v in vectors.values())
    assert json.loads(meta["info"])["task"] == "arc_easy"


def test_evaluate_model_with_the_expert(family, expert):
    name, path, work = family
    needs_all(name)
    out = run(work, "evaluate_model.py", "--model", path, "--task", "arc_challenge", "--limit", "2",
              "--max-new-tokens", "4", "--expert", expert[1], "--out", work / "eval.json")
    result = json.load(open(work / "eval.json"))
    assert result["n"] == 2 and len(result["records"]) == 2, out
    assert result["settings"]["expert"] == str(expert[1])


def test_cem_generation_writes_a_mix(family, expert):
    import safetensors_io
    name, path, work = family
    needs_all(name)
    out = run(work, "cem.py", "--model", path, "--task", "arc_challenge", "--experts", expert[1], expert[1],
              "--population", "2", "--generations", "1", "--shots", "2", "--max-new-tokens", "4",
              "--run-dir", work / "cem", "--out", work / "mix.safetensors")
    _, meta = safetensors_io.load(str(work / "mix.safetensors"))
    info = json.loads(meta["info"])
    assert len(info["alpha"]) == 2 and len(info["shots"]["ids"]) == 2, out


def test_adapt_answers_a_question_in_two_passes(family, expert):
    name, path, work = family
    needs_all(name)
    experts = [a for kind in ("code", "math", "reasoning") for a in (f"--{kind}-expert", expert[1])]
    out = run(work, "adapt.py", "--model", path, "--question", "What is 2 + 3?", *experts, "--max-new-tokens", "4")
    assert "pass 1:" in out and "pass 2" in out, out
