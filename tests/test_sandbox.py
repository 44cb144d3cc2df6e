"""The sandbox for generated code: hostile programs fail and leave the harness and the files outside
intact; the canonical solutions of MBPP (all 974) and HumanEval (164) pass.

The "bombs" are bounded (a few dozen forks, a few GiB, 100 MB of output), so that a broken guard
would show up as a failing test rather than take the machine down.
"""

import os
import stat
import time

import pytest

from data import get_task
from data.sandbox import Limits, run_many, run_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("T2_DATA_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no task data at {DATA}; set T2_DATA_DIR")
FAST = Limits(timeout_s=3, cpu_s=3)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('hello')\n")
    assert (ok.passed, ok.status, ok.returncode, ok.stdout) == (True, "passed", 0, "hello\n")
    bad = run_program("def f(x):\n    return x\n\nassert f(1) == 2\n")
    assert (bad.passed, bad.status) == (False, "failed") and "AssertionError" in bad.stderr
    assert not run_program("def f(:\n").passed                                 # syntax error


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleeps forever": "import time\ntime.sleep(3600)",
    "fork bomb": "import os\nfor _ in range(30):\n    os.fork()",
    "fork via posix": "import posix\nfor _ in range(30):\n    posix.fork()",
    "fork via _posixsubprocess": "import _posixsubprocess\n_posixsubprocess.fork_exec()",
    "subprocess": "import subprocess\nsubprocess.run(['sleep', '60'])",
    "multiprocessing": "import multiprocessing as mp\nmp.Process(target=print).start()",
    "os.system": "import os\nos.system('sleep 60')",
    "ctypes fork": "import ctypes\nctypes.CDLL(None).fork()",
    "memory bomb": "x = b'x' * (4 * 2**30)",
    "memory creep": "a = []\nfor _ in range(400):\n    a.append(bytearray(10**7))",
    "huge output": "for _ in range(10**5):\n    print('x' * 1000)",
    "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kill parent via posix": "import posix\nposix.kill(posix.getppid(), 9)",
    "kill everything": "import os\nos.killpg(0, 9)",
    "os._exit(0) before the asserts": "import os\nos._exit(0)\nassert False",
    "sys.exit(0)": "import sys\nsys.exit(0)\nassert False",
    "raise SystemExit": "raise SystemExit(0)",
    "exit()": "exit(0)",
    "fake marker": "print('\\nT2-SANDBOX-PASSED-' + '0' * 32)\nimport os\nos._exit(0)",
    "read stdin": "input()",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_fail_and_the_harness_survives(name):
    start = time.perf_counter()
    result = run_program(HOSTILE[name], FAST)
    assert not result.passed, (name, result)
    assert time.perf_counter() - start < FAST.timeout_s + 5
    assert len(result.stdout) <= 4000 and len(result.stderr) <= 4000             # output capped
    if name in ("infinite loop", "sleeps forever"):
        assert result.status == "timeout"


DELETERS = {
    "os.remove": "import os\nos.remove({path!r})",
    "posix.unlink": "import posix\nposix.unlink({path!r})",
    "pathlib": "import pathlib\npathlib.Path({path!r}).unlink()",
    "shutil.rmtree": "import shutil\nshutil.rmtree({dir!r})",
    "overwrite": "open({path!r}, 'w').write('gone')",
    "os.open": "import os\nos.open({path!r}, os.O_WRONLY | os.O_TRUNC)",
    "rename": "import posix\nposix.rename({path!r}, {path!r} + '.moved')",
    "chmod": "import posix\nposix.chmod({path!r}, 0o777)",
    "new file next to it": "open({dir!r} + '/intruder', 'w').write('x')",
}


@pytest.mark.parametrize("name", list(DELETERS))
def test_files_outside_the_working_directory_are_untouched(tmp_path, name):
    canary = tmp_path / "canary.txt"
    canary.write_text("precious")
    canary.chmod(0o444)
    result = run_program(DELETERS[name].format(path=str(canary), dir=str(tmp_path)), FAST)
    assert not result.passed, result
    assert canary.read_text() == "precious" and stat.S_IMODE(canary.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]


def test_environment_is_scrubbed(monkeypatch):
    secret = "hunter2-do-not-leak"
    monkeypatch.setenv("T2_FAKE_API_KEY", secret)
    snoop = ("import os\nenv = dict(os.environ)\nraw = open('/proc/self/environ', 'rb').read().decode()\n"
             "print(sorted(env))\n"
             f"assert any({secret!r} in v for v in env.values()) or {secret!r} in raw\n")
    result = run_program(snoop)
    assert not result.passed and secret not in result.stdout + result.stderr
    assert set(eval(result.stdout)) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "PYTHONHASHSEED"}


def test_working_directory_is_private_writable_and_removed():
    program = ("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('ok')\n"
               "assert open('scratch.txt').read() == 'ok'\n")
    result = run_program(program)
    assert result.passed, result
    work_dir = result.stdout.strip()
    assert os.path.basename(work_dir) == "work" and not os.path.exists(os.path.dirname(work_dir))


def test_a_program_that_hides_stdout_still_passes():
    result = run_program("import sys, io\nsys.stdout = io.StringIO()\nsys.stdout.close()\nassert 1 + 1 == 2\n")
    assert result.passed, result


def test_many_programs_run_in_parallel_in_order():
    sources = ["assert True", "assert False", "while True: pass", "print(1)"] * 3
    start = time.perf_counter()
    results = run_many(sources, Limits(timeout_s=2, cpu_s=2), workers=4)
    assert [r.passed for r in results] == [True, False, False, True] * 3
    assert time.perf_counter() - start < 3 * 2 + 5                    # timeouts overlap, not add up


@needs_data
def test_canonical_solutions_pass():
    """All 974 MBPP and all 164 HumanEval canonical solutions pass: 100.0% (974/974, 164/164).
    About a minute on 2 cores; MBPP 123 alone takes 5 s of CPU, within the 15 s default limits."""
    mbpp = get_task("mbpp", data_dir=DATA)
    problems = [mbpp.example(r) for r in mbpp.read("mbpp/mbpp.jsonl")]          # all ids, 1-974
    passed = mbpp.score_many(problems, [ex.answer for ex in problems])
    assert [ex.id for ex, ok in zip(problems, passed) if not ok] == [] and len(problems) == 974
    humaneval = get_task("humaneval", prompt="complete", data_dir=DATA)
    problems = humaneval.load("test")
    passed = humaneval.score_many(problems, [ex.answer for ex in problems])
    assert [ex.id for ex, ok in zip(problems, passed) if not ok] == [] and len(problems) == 164
