"""benchmarks/memory_plan.py: its formulas against svf's factor accounting and what autograd saves."""

import re

import pytest
import torch

import svf
from benchmarks import memory_plan
from conftest import TINY
from model import ModelConfig, Transformer


def test_the_smollm2_row_is_what_svf_reports(default_model):
    """The factors' bytes and ratio of the plan's SmolLM2 row, from its dims, against
    svf.check_factor_memory on the real checkpoint's MLP weights (the line a run prints)."""
    model, _ = default_model
    c, d = model.config, memory_plan.MODELS["SmolLM2-135M"]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.tie_word_embeddings) == (d.vocab, d.H, d.I, d.layers, d.heads, d.kv_heads, d.tied)
    assert d.params() == sum(p.numel() for p in model.parameters())
    weights = {n: model.get_parameter(n) for n in svf.target_names(model, "mlp")}
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        lines = []
        need = svf.check_factor_memory({n: w.to(dtype) for n, w in weights.items()}, dtype, torch.device("cpu"),
                                       log=lines.append)
        assert need == memory_plan.factor_bytes(d, size)
        ratio = float(re.search(r"\(([\d.]+)x the weights", lines[0]).group(1))
        assert ratio == round(memory_plan.factor_bytes(d, size) / memory_plan.mlp_bytes(d, size), 2)
    assert ratio == 1.38  # docs/several-gpus.md's line; 1 + H / I = 1.375, plus sigma


def saved_bytes(cfg, layers, dtype, B=2, T=16):
    """Bytes autograd saves for the backward of a forward pass with SVF's W' (the MLP) requiring grad."""
    model = Transformer(ModelConfig.from_hf(dict(cfg, num_hidden_layers=layers))).to(dtype)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as in training
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, mask, head=False)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_per_token_and_layer_are_what_autograd_saves(dtype):
    """One more layer saves exactly activation_bytes_per_token_layer per token (float32 norms and the
    padded batch's mask included): the formula the table applies to Llama-3's dims."""
    cfg, B, T = TINY["llama"], 2, 16
    d = memory_plan.Dims("tiny", cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], 3,
                         cfg["num_attention_heads"], cfg["num_key_value_heads"], True)
    per_layer = saved_bytes(cfg, 3, dtype, B, T) - saved_bytes(cfg, 2, dtype, B, T)
    size = torch.empty((), dtype=dtype).element_size()
    assert per_layer == B * T * memory_plan.activation_bytes_per_token_layer(d, size, seq=T)


def test_the_checkpointed_figure_is_objectives_69_kb():
    """objectives.CHECKPOINT_TOKENS's comment: 69 KB a token with checkpointing (SmolLM2, float32)."""
    assert memory_plan.checkpointed_bytes_per_token(memory_plan.MODELS["SmolLM2-135M"], 4) == 69_120


def test_the_table_says_which_models_fit():
    rows = memory_plan.table().splitlines()
    models = rows[2:5]
    assert [r.split("|")[1].strip() for r in models] == list(memory_plan.MODELS)
    assert [r.rstrip("| ").endswith("data parallel") for r in models] == [True, True, False]
    assert rows[6].startswith("| Llama-3-70B, FSDP2") and len(rows) == 10  # its plan on 8 and 16 GPUs
    assert all(memory_plan.fsdp_plan(memory_plan.MODELS["Llama-3-70B"], n)["peak"] < 80e9 for n in (8, 16))
