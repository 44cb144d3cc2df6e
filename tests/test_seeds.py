"""benchmarks/seeds.py: a recipe's runs at several seeds, summarized over seeds and paired by seed."""

import json
import sys

import pytest

from benchmarks import seeds


def write_run(d, step0, last, vs, unparsable=(0.4, 0.2)):
    d.mkdir()
    rows = [dict(kind="eval", step=0, accuracy=step0, unparsable=unparsable[0], vs_step0=[0.0, 0.0, 0.0]),
            dict(kind="step", step=1, reward=-0.5),
            dict(kind="eval", step=5, accuracy=last, unparsable=unparsable[1], vs_step0=vs)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def test_the_mean_over_seeds_has_a_t_interval():
    m, lo, hi = seeds.mean_interval([1.0, 2.0, 3.0])  # sd 1, 2 df: t 4.30
    assert m == 2.0 and hi - m == pytest.approx(4.30 / 3 ** 0.5) and m - lo == pytest.approx(hi - m)
    assert seeds.t975(17) == seeds.T975[15] and seeds.t975(100) == 1.96  # untabled df: the wider one


def test_runs_are_read_and_paired_by_seed(tmp_path, monkeypatch, capsys):
    a = [write_run(tmp_path / f"a{i}", 0.25, 0.25 + d, [d, d - 0.03, d + 0.03]) for i, d in enumerate((0.04, 0.06))]
    b = [write_run(tmp_path / f"b{i}", 0.25, 0.25 + d, [d, d - 0.03, d + 0.03]) for i, d in enumerate((0.01, 0.02))]
    assert seeds.read_run(a[0])["diff"] == pytest.approx(4.0)
    monkeypatch.setattr(sys, "argv", ["seeds", *a, "--against", *b])
    seeds.main()
    out = capsys.readouterr().out
    assert "2 of 2 runs' own intervals above 0" in out and "0 of 2 runs' own intervals above 0" in out
    assert "runs - against, paired by seed: +3.50 points" in out and "2 of 2 seeds higher" in out


def test_a_pair_from_another_seed_or_a_log_without_step_0_is_refused(tmp_path, monkeypatch):
    a = [write_run(tmp_path / f"a{i}", 0.25, 0.3, [0.05, 0.01, 0.09]) for i in range(2)]
    other = write_run(tmp_path / "other", 0.2, 0.3, [0.1, 0.05, 0.15])
    monkeypatch.setattr(sys, "argv", ["seeds", *a, "--against", a[0], other])
    with pytest.raises(SystemExit, match="step 0 reads 20.00%, its pair 25.00%: not the same seed"):
        seeds.main()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text(json.dumps(dict(kind="eval", step=5, accuracy=0.3)) + "\n")
    with pytest.raises(SystemExit, match=r"expected a validation at step 0 and a later one, found steps \[5\]"):
        seeds.read_run(str(tmp_path / "empty"))


def write_result(path, right):
    from data.evaluate import Record, Result
    records = [Record(f"q{i}", [], "A", "A", "A" if r else "B", bool(r)) for i, r in enumerate(right)]
    Result("arc_easy", "test", "first", records).save(str(path))
    return str(path)


def test_held_out_results_are_paired_within_a_seed_then_over_seeds(tmp_path, monkeypatch, capsys):
    # seed 0: a wins 2 items of 10, loses none (+20); seed 1: a wins 1, loses 1 (0); mean +10 over 2 seeds
    a = [write_result(tmp_path / "a0.json", [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]),
         write_result(tmp_path / "a1.json", [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])]
    b = [write_result(tmp_path / "b0.json", [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
         write_result(tmp_path / "b1.json", [0, 1, 0, 0, 0, 0, 0, 0, 0, 0])]
    monkeypatch.setattr(sys, "argv", ["seeds", *a, "--against", *b])
    seeds.main()
    out = capsys.readouterr().out
    assert "a0.json 30.00% against" in out and ": +20.00 (" in out and ": +0.00 (" in out
    assert "paired by seed, over 2 seeds: +10.00 points" in out and "1 of 2 seeds higher" in out
    monkeypatch.setattr(sys, "argv", ["seeds", *a])
    with pytest.raises(SystemExit):  # Result files alone: nothing to pair with
        seeds.main()
