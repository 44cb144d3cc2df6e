"""Shared fixtures: tiny random checkpoints written in Hugging Face layout, the real default model."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import safetensors_io  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

# The task data lives outside the repository; CI and developers have it in ../shared/data.
_shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
if "T2_DATA_DIR" not in os.environ and os.path.isdir(_shared):
    os.environ["T2_DATA_DIR"] = _shared
# No test fetches missing data from the internet (data/paths.py would); test_download.py serves its own.
os.environ["T2_OFFLINE"] = "1"

TINY = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=48,
                  intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=True, hidden_act="silu"),
    # Qwen2: q/k/v biases, untied head, rope_theta inside the newer "rope_parameters" block
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=101, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  max_position_embeddings=256, tie_word_embeddings=False, hidden_act="silu",
                  use_sliding_window=False, sliding_window=4096),
    # Llama 3.1: Llama-3 RoPE scaling, explicit head_dim
    "llama3": dict(model_type="llama", vocab_size=89, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=512,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   tie_word_embeddings=False, hidden_act="silu"),
    # Mistral v0.1: a sliding window (shorter than the tests' sequences, so that it matters),
    # an explicit head_dim that is not hidden_size / heads
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=103, hidden_size=48,
                    intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                    sliding_window=5, tie_word_embeddings=False, hidden_act="silu"),
}


def write_tiny_checkpoint(path, kind="llama", seed=0, **overrides):
    """Writes config.json + model.safetensors of a random model; returns the directory."""
    cfg = dict(TINY[kind], **overrides)
    config = ModelConfig.from_hf(cfg)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # larger than default init so that the tests see non-trivial attention patterns
            p.copy_(torch.randn_like(p) * (0.02 if "norm" not in name else 0.1) + ("norm" in name))
            if name.endswith("proj.weight"):
                p.mul_(5.0)
    state = {k: v for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    os.makedirs(path, exist_ok=True)
    safetensors_io.save(os.path.join(path, "model.safetensors"), state, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(kind="llama", **config_overrides) -> checkpoint directory."""
    counter = iter(range(1000))
    return lambda kind="llama", **kw: write_tiny_checkpoint(tmp_path / f"{kind}-{next(counter)}", kind, **kw)


@pytest.fixture(scope="session")
def default_model():
    """The real default checkpoint (SmolLM2-135M-Instruct), converted once and cached."""
    import checkpoints
    from model import load_model
    from tokenizer import Tokenizer
    path = checkpoints.default_model_dir()
    model, config = load_model(path)
    return model, Tokenizer.from_dir(path)
