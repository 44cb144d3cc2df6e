"""benchmarks/figures.py: the numbers behind Figures 4 and 5, and the pictures where matplotlib is installed."""

import json

import pytest
import torch

import safetensors_io
from benchmarks import figures


def routing_file(path, strategy, cells):
    path.write_text(json.dumps({"strategy": strategy, "confusion": [dict(true=t, chosen=c, n=n) for t, c, n in cells]}))
    return str(path)


def mix_file(path, task, alpha):
    info = {"kind": "fewshot-mix", "task": task, "alpha": alpha,
            "experts": [{"path": f"experts/{n}.safetensors", "task": n} for n in ("arc", "gsm8k", "mbpp")]}
    safetensors_io.save(str(path), {"p": torch.zeros(1)}, {"info": json.dumps(info)})
    return str(path)


def test_routing_files_of_one_strategy_add_up(tmp_path):
    files = [routing_file(tmp_path / "a.json", "cls", [("reasoning", "reasoning", 9), ("reasoning", "math", 1)]),
             routing_file(tmp_path / "b.json", "cls", [("math", "math", 5), ("reasoning", "math", 2)]),
             routing_file(tmp_path / "c.json", "prompt", [("code", "other", 4)])]
    m = figures.routing_matrices(files)
    assert m["cls"]["reasoning"] == {"reasoning": 9, "math": 3} and m["cls"]["math"] == {"math": 5}
    assert m["prompt"]["code"] == {"other": 4}
    (tmp_path / "bad.json").write_text(json.dumps({"strategy": "cls"}))
    with pytest.raises(ValueError, match="holds no routing"):
        figures.routing_matrices([str(tmp_path / "bad.json")])


def test_alphas_per_expert_and_per_matrix_means(tmp_path):
    rows = figures.mix_alphas([mix_file(tmp_path / "x.safetensors", "arc_challenge", [0.5, 0.25, 0.0]),
                               mix_file(tmp_path / "y.safetensors", "humaneval", [[0.2, 0.4], [1.0, 1.0], [0, 0]])])
    assert rows[0] == ("arc_challenge", ["arc", "gsm8k", "mbpp"], [0.5, 0.25, 0.0], [0.0, 0.0, 0.0])
    task, names, means, spread = rows[1]
    assert means == pytest.approx([0.3, 1.0, 0.0]) and spread == pytest.approx([0.1, 0.0, 0.0])


def test_pictures_are_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    written = figures.main(["--routing", routing_file(tmp_path / "a.json", "cls", [("math", "math", 3)]),
                            "--mixes", mix_file(tmp_path / "x.safetensors", "math500", [0.1, 0.7, 0.2]),
                            "--out", str(tmp_path / "fig")])
    assert [p.rsplit("/", 1)[1] for p in written] == ["routing.png", "alpha.png"]
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_curves_keep_the_last_row_of_a_step_logged_twice_by_a_resume(tmp_path):
    run = tmp_path / "arc-x"
    run.mkdir()
    rows = [{"kind": "eval", "step": 0, "accuracy": 0.25, "vs_step0": [0, 0, 0]},
            {"kind": "step", "step": 1, "grad_cos": 0.1}, {"kind": "step", "step": 2, "grad_cos": 0.9},
            {"kind": "step", "step": 2, "grad_cos": 0.3},                   # resumed: step 2 again
            {"kind": "step", "step": 3, "grad_cos": None},                  # a batch of equal rewards
            {"kind": "eval", "step": 3, "accuracy": 0.3, "vs_step0": [0.05, 0.01, 0.09]}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = figures.run_curves([str(run) + "/"])
    assert curves == {"arc-x": {"eval": [(0, 0.25, 0, 0, 0), (3, 0.3, 0.05, 0.01, 0.09)], "cos": [(1, 0.1), (2, 0.3)]}}
    with pytest.raises(ValueError, match="holds no log.jsonl"):
        figures.run_curves([str(tmp_path)])
    pytest.importorskip("matplotlib")
    assert figures.main(["--runs", str(run), "--out", str(tmp_path / "fig")]) == [str(tmp_path / "fig" / "runs.png")]
