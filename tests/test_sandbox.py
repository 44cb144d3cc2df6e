"""The sandbox for generated code: hostile programs fail and leave the harness and the files outside
intact, in both modes (namespaces and guard); the canonical solutions of MBPP (all 974) and
HumanEval (164) pass.

The "bombs" are bounded (a few dozen forks, a few GiB, 200 MB of disk, 100 MB of output), so that a
broken guard would show up as a failing test rather than take the machine down. The namespace tests
are skipped, with the reason, where namespaces cannot be made; CI runs as root, so there they run.
"""

import inspect
import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest

from data import get_task
from data import sandbox
from data.sandbox import Limits, default_mode, namespaces_problem, run_many, run_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("T2_DATA_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no task data at {DATA}; set T2_DATA_DIR")
FAST = Limits(timeout_s=3, cpu_s=3)
PROBLEM = namespaces_problem()
needs_namespaces = pytest.mark.skipif(PROBLEM is not None, reason=f"no namespaces here: {PROBLEM}")
MODES = [pytest.param("namespaces", marks=needs_namespaces), "guard"]


@pytest.mark.parametrize("mode", MODES)
def test_a_correct_program_passes_and_a_wrong_one_fails(mode):
    ok = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('hello')\n", mode=mode)
    assert (ok.passed, ok.status, ok.returncode, ok.stdout) == (True, "passed", 0, "hello\n")
    bad = run_program("def f(x):\n    return x\n\nassert f(1) == 2\n", mode=mode)
    assert (bad.passed, bad.status) == (False, "failed") and "AssertionError" in bad.stderr
    assert not run_program("def f(:\n", mode=mode).passed                            # syntax error


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
    "leave the process group": "import posix, time\nposix.setsid()\ntime.sleep(60)",
    "raise its own limits": "import __main__\n__main__.resource.setrlimit(__main__.resource.RLIMIT_CPU, (-1, -1))",
    "os._exit(0) before the asserts": "import os\nos._exit(0)\nassert False",
    "sys.exit(0)": "import sys\nsys.exit(0)\nassert False",
    "raise SystemExit": "raise SystemExit(0)",
    "exit()": "exit(0)",
    "fake marker": "print('\\nT2-SANDBOX-PASSED-' + '0' * 32)\nimport os\nos._exit(0)",
    "read stdin": "input()",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_fail_and_the_harness_survives(name, mode):
    start = time.perf_counter()
    result = run_program(HOSTILE[name], FAST, mode=mode)
    assert not result.passed, (name, result)
    assert time.perf_counter() - start < FAST.timeout_s + 5
    assert len(result.stdout) <= 4000 and len(result.stderr) <= 4000             # output capped
    if name in ("infinite loop", "sleeps forever"):
        assert result.status == "timeout"


@pytest.mark.parametrize("mode", MODES)
def test_the_cpu_limit_binds_before_the_wall_clock_and_counts_as_a_timeout(mode):
    # A busy loop under a 1 s CPU limit and a 30 s wall clock: SIGXCPU ends it, not the wall clock.
    result = run_program(HOSTILE["infinite loop"], Limits(timeout_s=30, cpu_s=1), mode=mode)
    assert (result.passed, result.status, result.returncode) == (False, "timeout", -signal.SIGXCPU)
    assert result.seconds < 15
    # A program that catches SIGXCPU is killed one CPU second later: SIGKILL, not a timeout.
    stubborn = "import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\nwhile True:\n    pass"
    result = run_program(stubborn, Limits(timeout_s=30, cpu_s=1), mode=mode)
    assert (result.passed, result.status, result.returncode) == (False, "killed", -signal.SIGKILL)


# A second interpreter has no audit hook; this one loads the module past `sys.modules[name] = None`.
SECOND_INTERPRETER = ("import importlib.machinery, importlib.util\n"
                      "spec = importlib.machinery.PathFinder.find_spec('_xxsubinterpreters')\n"
                      "xi = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(xi)\n"
                      "xi.run_string(xi.create(), {code!r})\n")
DELETERS = {
    "os.remove": "import os\nos.remove({path!r})",
    "posix.unlink": "import posix\nposix.unlink({path!r})",
    "pathlib": "import pathlib\npathlib.Path({path!r}).unlink()",
    "shutil.rmtree": "import shutil\nshutil.rmtree({dir!r})",
    "overwrite": "open({path!r}, 'w').write('gone')",
    "os.open": "import os\nos.open({path!r}, os.O_WRONLY | os.O_TRUNC)",
    "rename": "import posix\nposix.rename({path!r}, {path!r} + '.moved')",
    "chmod": "import posix\nposix.chmod({path!r}, 0o777)",
    "chmod by descriptor": "import os, posix\nposix.chmod(os.open({path!r}, os.O_RDONLY), 0o777)",
    "through a directory descriptor": "import os\nd = os.open({dir!r}, os.O_RDONLY)\n"
                                      "os.open('canary.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=d)",
    "new file next to it": "open({dir!r} + '/intruder', 'w').write('x')",
    "from a second interpreter": SECOND_INTERPRETER.replace("{code!r}", "{write!r}"),
    "clear the hook's tables, then a hard link": "import __main__, os\n__main__.PATH_ARGS.clear()\n"
                                                 "os.link({path!r}, 'x')\nopen('x', 'w').write('gone')",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(DELETERS))
def test_files_outside_the_working_directory_are_untouched(tmp_path, name, mode):
    canary = tmp_path / "canary.txt"
    canary.write_text("precious")
    canary.chmod(0o444)
    write = f"open({str(canary)!r}, 'w').write('gone')"
    result = run_program(DELETERS[name].format(path=str(canary), dir=str(tmp_path), write=write), FAST, mode=mode)
    assert not result.passed, result
    assert canary.read_text() == "precious" and stat.S_IMODE(canary.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]


def test_environment_is_scrubbed(monkeypatch):
    secret = "hunter2-do-not-leak"
    monkeypatch.setenv("T2_FAKE_API_KEY", secret)
    snoop = ("import os\nenv = dict(os.environ)\nprint(sorted(env))\n"
             f"assert any({secret!r} in v for v in env.values())\n")
    result = run_program(snoop)
    assert not result.passed and secret not in result.stdout + result.stderr
    assert set(eval(result.stdout)) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "PYTHONHASHSEED"}


# Issue #18, class 1: the harness's environment (secrets included) through /proc of its parent and
# of every other process it can see. /proc/PID/environ shows a process's environment at start-up,
# so the secret goes into the environment of a harness process started for the purpose.
SNOOP_PROC = """import os
try:
    pids = ["self", str(os.getppid())] + sorted(os.listdir("/proc"))
except OSError:
    pids = ["self", str(os.getppid())] + [str(pid) for pid in range(1, 2**15)]
found = []
for pid in pids:
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if b"hunter2" in f.read():
                    found.append(f"{pid}/{name}")
        except OSError:
            pass
print("found:", found)
assert found
"""
HARNESS = ("import json, sys; sys.path.insert(0, sys.argv[1]); from data.sandbox import run_program; "
           "r = run_program(sys.argv[2], mode=sys.argv[3], guard=sys.argv[4] == 'guard'); "
           "print(json.dumps([r.passed, r.stdout, r.stderr]))")


@pytest.mark.parametrize("mode, guard", [pytest.param("namespaces", "unguarded", marks=needs_namespaces),
                                         pytest.param("namespaces", "guard", marks=needs_namespaces),
                                         ("guard", "guard")])
def test_the_harness_environment_cannot_be_read_through_proc(mode, guard):
    secret = "hunter2-do-not-leak"
    env = {**os.environ, "T2_FAKE_API_KEY": secret}
    out = subprocess.run([sys.executable, "-c", HARNESS, ROOT, SNOOP_PROC, mode, guard], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    passed, stdout, stderr = json.loads(out)
    assert not passed and "found: []" in stdout, stdout + stderr
    assert secret not in stdout + stderr


# Issue #18, class 2: a disk bomb, 1 MB files until something stops it (200 MB here, to stay bounded);
# run_many runs two at once, as it would in training.
DISK_BOMB = """n = 0
try:
    for i in range(200):
        with open(f"f{i}", "wb") as f:
            f.write(b"x" * 2**20)
        n += 1
except OSError as e:
    print("stopped:", e)
print("MB written:", n)
"""


@pytest.mark.parametrize("mode, guard, limits, stopped_by, most", [
    pytest.param("namespaces", True, Limits(disk_mb=8), "No space left on device", 8, marks=needs_namespaces),
    pytest.param("namespaces", False, Limits(disk_mb=8), "No space left on device", 8, marks=needs_namespaces),
    pytest.param("namespaces", False, Limits(files=5), "No space left on device", 5, marks=needs_namespaces),
    ("guard", True, Limits(files=16), "may create at most 16 files", 16)])
def test_a_disk_bomb_stops_at_the_cap(mode, guard, limits, stopped_by, most):
    """guard=False: the namespace's tmpfs alone, by size (disk_mb) and by number of files (files)."""
    if guard:
        results = run_many([DISK_BOMB] * 2, limits, workers=2, mode=mode)        # two at once, as in training
    else:
        results = [run_program(DISK_BOMB, limits, mode=mode, guard=False)]
    for result in results:
        written = int(result.stdout.split("MB written:")[1])
        assert stopped_by in result.stdout and written <= most, result


# Issue #18, class 3: special files, which os.mkfifo and os.mknod make without any audit event.
SPECIAL_FILES = {
    "os.mkfifo": "os.mkfifo({path!r})",
    "posix.mkfifo": "import posix\nposix.mkfifo({path!r})",
    "os.mknod, a FIFO": "os.mknod({path!r}, stat.S_IFIFO | 0o600)",
    "os.mknod, a device": "os.mknod({path!r}, stat.S_IFCHR | 0o600, os.makedev(1, 3))",
    "a device in the working directory": "os.mknod('null', stat.S_IFCHR | 0o600, os.makedev(1, 3))\n"
                                         "open('null', 'w').write('through a device')",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SPECIAL_FILES))
def test_no_special_files(tmp_path, name, mode):
    program = "import os, stat\n" + SPECIAL_FILES[name].format(path=str(tmp_path / "special"))
    result = run_program(program, FAST, mode=mode)
    assert not result.passed, result
    assert list(tmp_path.iterdir()) == []


@needs_namespaces
def test_namespaces_alone_forbid_device_files_network_and_other_processes():
    """What the operating system holds in namespace mode, with the in-process guard left out."""
    program = """import json, os, socket, stat
facts = {"interfaces": socket.if_nameindex(), "parent": os.getppid(),
         "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
try:
    os.mknod("null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
except OSError as e:
    facts["mknod"] = e.strerror
try:
    socket.create_connection(("1.1.1.1", 53), timeout=1)
except OSError as e:
    facts["connect"] = e.strerror
work = [line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == os.getcwd()]
facts["work"] = work[-1][-3] if work else None
print(json.dumps(facts))
"""
    result = run_program(program, FAST, mode="namespaces", guard=False)
    facts = json.loads(result.stdout)
    assert result.passed, result
    assert facts["interfaces"] == [[1, "lo"]] and facts["connect"] == "Network is unreachable"
    assert facts["parent"] == 1 and len(facts["processes"]) <= 3                  # init, the child, (mount)
    assert facts["mknod"] == "Operation not permitted" and facts["work"] == "tmpfs"


@needs_namespaces
def test_processes_die_with_the_namespace(tmp_path, monkeypatch):
    """A grandchild that leaves the process group is out of os.killpg's reach; it dies with the
    namespace. (In guard mode only the guard's refusal of fork keeps it from existing.)"""
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))   # the job directories go here
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    result = run_program(program, Limits(timeout_s=3, processes=8), mode="namespaces", guard=False)
    assert result.returncode == 0, result
    time.sleep(0.2)
    assert [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path) in cwd_of(pid)] == []


def cwd_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


@pytest.mark.parametrize("mode", MODES)
def test_a_process_that_leaves_its_group_is_still_killed_at_the_timeout(mode):
    """Without the guard, which disables setsid. (In guard mode the child leads its group, and
    setsid fails; in namespace mode the child is not the leader, unshare is.)"""
    program = "import os, time\ntry:\n    os.setsid()\nexcept OSError:\n    pass\ntime.sleep(60)\n"
    start = time.perf_counter()
    result = run_program(program, FAST, mode=mode, guard=False)
    assert result.status == "timeout" and time.perf_counter() - start < FAST.timeout_s + 5


# Issue #18, class 4: a pass without running the tests. The first program is the issue's: find the
# success marker in the memory of the process and print it, then exit early. There is no marker now;
# the others try to produce the completion signal (a write to ../done) themselves, or skip the tests.
TESTS = "\nassert False, 'the tests'\n"
FORGERS = {
    "the marker from memory": """import gc, os, sys
def strings():
    frame = sys._getframe()
    while frame is not None:
        yield from list(frame.f_locals.values()) + list(frame.f_globals.values())
        frame = frame.f_back
    yield from sys.argv
    yield from os.environ.values()
    try:
        yield from gc.get_objects()
    except PermissionError:
        pass
for s in {s for s in strings() if isinstance(s, str) and s.startswith("T2-SANDBOX-PASSED-")}:
    print("\\n" + s, flush=True)
os._exit(0)
""" + TESTS,
    "write ../done": "open('../done', 'w').write('done')\nimport os\nos._exit(0)" + TESTS,
    "../done read-write": "import os\nos.write(os.open('../done', os.O_RDWR), b'done')\nos._exit(0)" + TESTS,
    "../done by its absolute path": "import os\nopen(os.path.abspath('../done'), 'w').write('done')\n"
                                    "os._exit(0)" + TESTS,
    "../done through a symlink": "import os\nos.symlink(os.path.abspath('../done'), 'd')\n"
                                 "open('d', 'w').write('done')\nos._exit(0)" + TESTS,
    "../done through /proc": "open('/proc/self/cwd/../done', 'w').write('done')\nimport os\nos._exit(0)" + TESTS,
    "../done from a second interpreter": SECOND_INTERPRETER.format(code="open('../done', 'w').write('done')")
                                         + "import os\nos._exit(0)" + TESTS,
    "the child's main() again": """import __main__, os, types
open("harmless.py", "w").write("pass")        # a program that returns at once, run by a second main()
names = dict(vars(__main__), PROGRAM="harmless.py", set_limits=lambda limits: None)
types.FunctionType(__main__.main.__code__, names)()
os._exit(0)
""" + TESTS,
    "a trace function jumps over the tests": """import sys
def tracer(frame, event, arg):
    if event == "line" and frame.f_code.co_filename == "program.py" and frame.f_lineno == 9:
        frame.f_lineno = 10
    return tracer
sys._getframe().f_trace = tracer
sys.settrace(tracer)
x = 0
assert x == 1, "the tests"
print("the tests were jumped over")
""",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FORGERS))
def test_a_forged_pass_fails(name, mode):
    result = run_program(FORGERS[name], FAST, mode=mode)
    assert not result.passed, result


def test_a_callback_in_the_frame_of_main_on_another_line_is_refused():
    """A weakref callback runs in whatever frame is current: here main()'s, on its `return 1`
    line, when the exception that holds the token dies. The hook looks at the line, not only the frame."""
    program = """import builtins, functools, io, weakref
class Token:
    pass
def fail():
    token = Token()
    builtins.keep = weakref.ref(token, functools.partial(io.FileIO, "../done", "w", True))
    raise Exception(token)
fail()
"""
    result = run_program(program, FAST, mode="guard")
    assert not result.passed and "../done is the sandbox's completion signal" in result.stderr, result


def test_without_the_guard_the_forgers_would_pass():
    """The control for the test above: its programs do forge a pass once the audit hook is gone."""
    assert run_program(FORGERS["write ../done"], FAST, mode="guard", guard=False).passed
    jump = run_program(FORGERS["a trace function jumps over the tests"], FAST, mode="guard", guard=False)
    assert jump.passed and jump.stdout == "the tests were jumped over\n"


def test_the_completion_signal_is_the_last_line_of_main():
    """The audit hook lets only the last line of main() open ../done: that line must be the one."""
    from data import _sandbox_child as child
    lines, first = inspect.getsourcelines(child.main)
    assert child.last_line(child.main.__code__) == first + len(lines) - 1
    assert "os.open(DONE" in lines[-1]


def test_the_mode_is_chosen_once_warned_about_and_can_be_forced(monkeypatch):
    monkeypatch.setenv("T2_SANDBOX", "guard")
    assert default_mode() == "guard"
    monkeypatch.setenv("T2_SANDBOX", "chroot")
    with pytest.raises(ValueError, match="T2_SANDBOX must be one of"):
        default_mode()
    monkeypatch.setattr(sandbox, "namespaces_problem", lambda: "no unshare here")
    monkeypatch.setenv("T2_SANDBOX", "namespaces")
    with pytest.raises(RuntimeError, match="no unshare here"):
        default_mode()
    monkeypatch.delenv("T2_SANDBOX")
    sandbox._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="in-process guard alone .no unshare here"):
        assert default_mode() == "guard"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_mode() == "guard"                     # warned once only


@pytest.mark.parametrize("mode", MODES)
def test_working_directory_is_private_writable_and_removed(mode):
    program = ("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('ok')\n"
               "assert open('scratch.txt').read() == 'ok'\n")
    result = run_program(program, mode=mode)
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
    """All 974 MBPP and all 164 HumanEval canonical solutions pass: 100.0% (974/974, 164/164), in
    the default mode. About a minute on 2 cores; MBPP 123 alone takes 5 s of CPU, within the 15 s
    default limits. (benchmarks/bench_sandbox.py runs them in both modes.)"""
    mbpp = get_task("mbpp", data_dir=DATA)
    problems = [mbpp.example(r) for r in mbpp.read("mbpp/mbpp.jsonl")]          # all ids, 1-974
    passed = mbpp.score_many(problems, [ex.answer for ex in problems])
    assert [ex.id for ex, ok in zip(problems, passed) if not ok] == [] and len(problems) == 974
    humaneval = get_task("humaneval", prompt="complete", data_dir=DATA)
    problems = humaneval.load("test")
    passed = humaneval.score_many(problems, [ex.answer for ex in problems])
    assert [ex.id for ex, ok in zip(problems, passed) if not ok] == [] and len(problems) == 164
