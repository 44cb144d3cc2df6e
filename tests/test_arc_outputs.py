"""benchmarks/arc_outputs.py: the summary of saved ARC outputs counts one, several and no options named
by the task's own rule, and pairs two runs item by item."""

from benchmarks.arc_outputs import main, summary
from data import Result, get_task
from data.evaluate import Record


def result(task, items, outputs):
    return Result(task.name, "test", task.prompt, records=[
        Record(ex.id, ex.messages, out, task.extract(out, ex), ex.answer, task.score(ex, out))
        for ex, out in zip(items, outputs, strict=True)])


def test_one_several_and_none_are_counted_and_the_runs_paired(tmp_path, capsys):
    task = get_task("arc_easy", prompt="first")
    items = task.load("test")[:3]
    gold = [next(o for o in ex.meta["options"] if task.score(ex, o)) for ex in items]
    wrong = [next(o for o in ex.meta["options"] if o != g) for ex, g in zip(items, gold)]
    base = [f"It is {wrong[0]}.", "I do not know.", f"{gold[2]} or {wrong[2]}"]   # wrong, none, several
    expert = [f"It is {gold[0]}.", gold[1], f"{gold[2]} or {wrong[2]}"]           # right, right, several
    a, b = result(task, items, base), result(task, items, expert)
    assert [r.correct for r in a.records] == [False] * 3 and [r.correct for r in b.records] == [True, True, False]
    assert "one option named 1, several 1, none 1; right when one is named 0.0%" in summary(task, a)
    assert "one option named 2, several 1, none 0; right when one is named 100.0%" in summary(task, b)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--samples", "2"])
    out = capsys.readouterr().out
    assert "+66.67%" in out and "2 won, 0 lost" in out
    assert out.count("first (wrong)") == 2 and out.count("last  (right)") == 2
