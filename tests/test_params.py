"""params.py: the parameter counts of every approach, against the paper's Table 4 and the formulas."""

import json

import params
import svf


def test_lora_on_q_and_v_of_llama3_8b_is_the_papers_6_82M():
    c = params.count(params.LLAMA3_8B, "lora", "qv", 16)
    assert c == 32 * 16 * ((4096 + 4096) + (1024 + 4096)) == 6_815_744  # q (4096, 4096), v (8 heads * 128, 4096)
    assert round(c / 1e6, 2) == 6.82
    assert params.count(params.LLAMA3_8B, "lora", "qv", 8) * 2 == c  # linear in the rank
    assert round(params.count(params.LLAMA3_8B, "svf", "mlp") / 1e6, 2) == 0.39
    assert params.count(params.LLAMA3_8B, "svf", "qv") == 32 * (4096 + 1024)  # 0.16M, Table 4's attention figure


def test_lora_xs_and_the_truncated_svd_fine_tune():
    assert params.count(params.LLAMA3_8B, "lora-xs", "qv", 16) == 32 * 2 * 16 * 16
    # SVD fine-tune at 0.1: k = round(0.1 * min(m, n)) per matrix, k (m + n + 1) parameters
    gate = round(0.1 * 4096) * (14336 + 4096 + 1)
    assert params.per_matrix("svd-ft", 14336, 4096, 0.1) == gate == 410 * 18433
    assert params.count(params.LLAMA3_8B, "svd-ft", "mlp", 0.1) == 32 * 3 * gate


def test_qwen2_5_1_5b_from_its_config():
    q = params.QWEN25_1_5B
    assert params.count(q, "lora", "qv", 16) == 28 * 16 * ((1536 + 1536) + (256 + 1536))  # 2 KV heads of 128
    assert params.count(q, "svf", "mlp") == 28 * 3 * 1536
    assert round(params.count(q, "full") / 1e9, 2) == 1.54  # Qwen's model card: 1.54B


def test_full_count_matches_llama3_8b_and_the_default_model(default_model):
    assert round(params.count(params.LLAMA3_8B, "full") / 1e9, 2) == 8.03
    import checkpoints
    cfg = json.load(open(f"{checkpoints.default_model_dir()}/config.json"))
    model, _ = default_model
    assert params.count(cfg, "full") == sum(p.numel() for p in model.parameters())


def test_the_table_has_every_row_and_svf_count_prints_it(capsys, tmp_path):
    cfg = dict(params.LLAMA3_8B, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    svf.main(["--count", "--model", str(tmp_path)])
    out = capsys.readouterr().out
    for label, *_ in params.ROWS:
        assert label in out, label
    row = next(line for line in out.splitlines() if line.startswith("LoRA r=16, q,v"))
    assert row.split()[-3:] == ["6.82M", "2.18M", "6.82M"] and "0.43M" in row  # 2 layers: 6.82M / 16
