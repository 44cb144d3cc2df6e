"""Code tasks: extracting programs from outputs, assembling test programs, scoring in the sandbox.
(The sandbox itself and the canonical-solution pass rates are in test_sandbox.py.)"""

import os

import pytest

from data import Result, evaluate, get_task
from data.codegen import extract_code
from data.sandbox import default_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("T2_DATA_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no task data at {DATA}; set T2_DATA_DIR")


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"   # unterminated
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"              # no fences
    two = "```python\nprint(f(2))\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(two) == "def f(x):\n    return x\n"                                # the one defining
    assert extract_code(two.replace("def f", "def g"), must_define="f") == "def g(x):\n    return x\n"
    assert extract_code("") is None and extract_code("```python\n\n```") is None
    assert extract_code("Sorry, I cannot write ```code``` for that.") is None
    # the last block that defines the function with a body wins: a restated function corrects the first
    stub, fixed = "```python\ndef f(x):\n    \"\"\"Doc.\"\"\"\n```", "```python\ndef f(x):\n    return x\n```"
    assert extract_code(f"{stub}\n{fixed}", must_define="f") == "def f(x):\n    return x\n"
    assert extract_code(f"{fixed}\n{stub}", must_define="f") == "def f(x):\n    return x\n"   # not the stub
    older = fixed.replace("return x", "return 0")
    assert extract_code(f"{older}\n{fixed}", must_define="f") == "def f(x):\n    return x\n"


@needs_data
def test_humaneval_a_function_restated_after_the_closed_prefill_is_scored():
    """The model closes the prefilled fence at once (leaving the docstring only) and writes the
    function again in a new fence: that second block is the answer (defect 4 of issue 13)."""
    task = get_task("humaneval", data_dir=DATA)
    for ex in task.load("test")[:20]:
        full = ex.meta["prompt"][ex.meta["prompt"].index(f"def {ex.meta['entry_point']}"):] + ex.answer
        output = f"\n```\n\nHere is the solution:\n```python\n{full}```\n"
        assert task.score(ex, output), ex.id


@needs_data
def test_mbpp_entry_point_is_the_function_the_tests_call():
    task = get_task("mbpp", data_dir=DATA)
    examples = [ex for s in task.splits for ex in task.load(s)]
    assert all(f"def {ex.meta['entry_point']}" in ex.answer for ex in examples)
    ex = next(e for e in examples if e.id == "mbpp/912")                   # assert int(lobb_num(5, 3)) == 35
    assert ex.meta["entry_point"] == "lobb_num"


@needs_data
def test_mbpp_solutions_in_every_format():
    task = get_task("mbpp", data_dir=DATA)
    ex = task.load("validation")[0]
    code = ex.answer.replace("\r\n", "\n")
    outputs = [f"```python\n{code}\n```", code, f"Sure!\n```python\n{code}\n```\nThis works because..."]
    assert task.score_many([ex] * 3, outputs) == [True] * 3
    official = get_task("mbpp", prompt="official", data_dir=DATA).load("validation")[0]
    assert official.messages[-1] == {"role": "assistant", "content": "```python"}              # the prefill
    assert task.score(official, f"\n{code}\n```\nExplanation.")
    wrong = code.replace("return", "return None and", 1)
    assert not task.score(ex, wrong) and not task.score(ex, "I don't know.")
    assert task.extract("I don't know.```", ex) is None


@needs_data
def test_humaneval_body_full_function_and_prefill():
    task = get_task("humaneval", prompt="complete", data_dir=DATA)
    ex = task.load("test")[2]                     # truncate_number
    body = ex.answer
    full = ex.meta["prompt"][ex.meta["prompt"].index("def "):] + body
    usage = "```python\nprint(truncate_number(3.5))\n```"
    outputs = [body, f"```python\n{full}```", f"```python\n{full}```\n{usage}"]
    assert task.score_many([ex] * 3, outputs) == [True] * 3
    official = get_task("humaneval", prompt="official", data_dir=DATA).load("test")[2]
    assert official.messages[-1]["content"].startswith("```python\ndef truncate_number")
    assert task.score(official, "\n" + body + "```")                             # continues the prefill
    assert not task.score(ex, "    return number\n") and not task.score(ex, "")
    helper = task.load("test")[38]                # decode_cyclic: the prompt defines a helper
    assert "def encode_cyclic" in helper.meta["prompt"]
    restated = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    assert task.score(helper, restated)          # the prompt's helper is kept above the model's code


@needs_data
def test_evaluate_a_code_task():
    task = get_task("mbpp", data_dir=DATA)
    gold = {ex.messages[-1]["content"]: ex.answer for ex in task.load("test")[:6]}
    result = evaluate(task, "test", lambda batch: [f"```python\n{gold[m[-1]['content']]}\n```" for m in batch],
                      limit=6, batch_size=3, progress=False)
    assert result.accuracy == 1.0 and all(r.extracted for r in result.records)


@needs_data
def test_results_record_the_sandbox_mode_and_resume_files_without_it():
    task = get_task("mbpp", data_dir=DATA)
    examples = task.load("validation")[:2]
    solutions = {ex.messages[-1]["content"]: ex.answer for ex in examples}
    solve = lambda batch: [f"```python\n{solutions[m[-1]['content']]}\n```" for m in batch]  # noqa: E731
    result = evaluate(task, examples, solve, progress=False, settings={"m": 1})
    assert result.correct == 2 and result.settings == {"m": 1, "sandbox": default_mode()}
    saved_before_the_mode_was_recorded = Result(task.name, "custom", task.prompt, result.records[:1],
                                                settings={"m": 1})
    resumed = evaluate(task, examples, solve, progress=False, settings={"m": 1},
                       previous=saved_before_the_mode_was_recorded)
    assert resumed.correct == 2 and resumed.settings["sandbox"] == default_mode()
