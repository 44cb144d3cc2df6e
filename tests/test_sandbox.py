"""The sandbox for generated code: hostile programs fail and leave the harness and the files outside
intact, in every mode (bwrap, namespaces, guard); the canonical solutions of MBPP (all 974) and
HumanEval (164) pass in every mode.

The "bombs" are bounded (a few dozen forks, a few GiB, 200 MB of disk, 100 MB of output), so that a
broken guard would show up as a failing test rather than take the machine down. The tests of a
namespace mode are skipped, with the reason, where it cannot be made; CI runs as root and installs
bubblewrap, so there they run. Issues 29's and 39's classes each have one test below ("class N"), run
in every mode it applies to; `guard=False` runs show what the kernel holds alone, with the guard left out.
"""

import errno
import inspect
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import pytest

from data import get_task
from data import _seccomp, sandbox
from data.sandbox import Limits, default_mode, mode_problem, run_many, run_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("T2_DATA_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no task data at {DATA}; set T2_DATA_DIR")
FAST = Limits(timeout_s=3, cpu_s=3)


def in_mode(mode, guard=True, *more):
    """A test case in `mode`, skipped with the reason where the mode does not work here."""
    problem = mode_problem(mode)
    return pytest.param(mode, guard, *more, id=f"{mode}-{'guard' if guard else 'kernel alone'}",
                        marks=pytest.mark.skipif(problem is not None, reason=f"no {mode} here: {problem}"))


MODES = [in_mode("bwrap"), in_mode("namespaces"), in_mode("guard")]
KERNEL = [in_mode("bwrap", False), in_mode("namespaces", False)]   # the namespace modes without the guard


@pytest.mark.parametrize("mode, guard", MODES)
def test_a_correct_program_passes_and_a_wrong_one_fails(mode, guard):
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
    "a thread": "import threading\nthreading.Thread(target=print).start()",
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
    "read stdin": "input()",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
}


@pytest.mark.parametrize("mode, guard", MODES)
def test_hostile_programs_fail_and_the_harness_survives(mode, guard):
    for name, program in HOSTILE.items():
        start = time.perf_counter()
        result = run_program(program, FAST, mode=mode)
        assert not result.passed, (name, result)
        assert time.perf_counter() - start < FAST.timeout_s + 5, name
        assert len(result.stdout) <= 4000 and len(result.stderr) <= 4000             # output capped
        if name in ("infinite loop", "sleeps forever"):
            assert result.status == "timeout", name


@pytest.mark.parametrize("mode, guard", MODES)
def test_the_cpu_limit_binds_before_the_wall_clock_and_counts_as_a_timeout(mode, guard):
    # A busy loop under a 1 s CPU limit and a 30 s wall clock: SIGXCPU ends it, not the wall clock.
    result = run_program(HOSTILE["infinite loop"], Limits(timeout_s=30, cpu_s=1), mode=mode)
    assert (result.passed, result.status, result.returncode) == (False, "timeout", -signal.SIGXCPU)
    assert result.seconds < 15
    # A program that catches SIGXCPU is killed one CPU second later: SIGKILL, not a timeout (the
    # guard refuses signal handlers, so this one runs without it).
    stubborn = "import signal\nsignal.signal(signal.SIGXCPU, lambda *a: None)\nwhile True:\n    pass"
    result = run_program(stubborn, Limits(timeout_s=30, cpu_s=1), mode=mode, guard=False)
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


@pytest.mark.parametrize("mode, guard", MODES + KERNEL)
def test_files_outside_the_working_directory_are_untouched(tmp_path, mode, guard):
    canary = tmp_path / "canary.txt"
    for name, program in DELETERS.items():
        canary.write_text("precious")
        canary.chmod(0o444)
        write = f"open({str(canary)!r}, 'w').write('gone')"
        result = run_program(program.format(path=str(canary), dir=str(tmp_path), write=write), FAST, mode=mode,
                             guard=guard)
        assert not result.passed or not guard, (name, result)
        assert canary.read_text() == "precious" and stat.S_IMODE(canary.stat().st_mode) == 0o444, name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"], name


def test_environment_is_scrubbed(monkeypatch):
    secret = "hunter2-do-not-leak"
    monkeypatch.setenv("T2_FAKE_API_KEY", secret)
    snoop = ("import os\nenv = dict(os.environ)\nprint(sorted(env))\n"
             f"assert any({secret!r} in v for v in env.values())\n")
    result = run_program(snoop)
    assert not result.passed and secret not in result.stdout + result.stderr
    assert set(eval(result.stdout)) <= set(sandbox.scrubbed_env("/"))


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


@pytest.mark.parametrize("mode, guard", MODES + KERNEL)
def test_the_harness_environment_cannot_be_read_through_proc(mode, guard):
    secret = "hunter2-do-not-leak"
    env = {**os.environ, "T2_FAKE_API_KEY": secret}
    out = subprocess.run([sys.executable, "-c", HARNESS, ROOT, SNOOP_PROC, mode, "guard" if guard else "unguarded"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    passed, stdout, stderr = json.loads(out)
    assert not passed and secret not in stdout + stderr, stdout + stderr
    assert "found: []" in stdout or "/proc is not readable" in stderr, stdout + stderr


# Issue #18, class 2: a disk bomb, 1 MB files until something stops it (200 MB here, to stay bounded);
# run_many runs two at once, as it would in training.
DISK_BOMB = """n = 0
try:
    for i in range(200):
        with open(f"f{i}", "wb") as f:
            f.write(b"x" * 2**20)
        n += 1
        print("MB written:", n)
except OSError as e:
    print("stopped:", e)
"""


@pytest.mark.filterwarnings("ignore:sandbox. run_many in guard mode")
@pytest.mark.parametrize("mode, guard, limits, stopped_by, most", [
    in_mode("bwrap", True, Limits(disk_mb=8), "No space left on device", 8),
    in_mode("bwrap", False, Limits(disk_mb=8), "No space left on device", 8),
    in_mode("namespaces", False, Limits(disk_mb=8), "No space left on device", 8),
    in_mode("namespaces", False, Limits(files=5), "No space left on device", 5),
    in_mode("bwrap", False, Limits(files=5), "No space left on device", 5),
    in_mode("guard", True, Limits(files=16), "may create at most 16 files", 16)])
def test_a_disk_bomb_stops_at_the_cap(mode, guard, limits, stopped_by, most):
    """guard=False: the namespace's tmpfs alone, by size (disk_mb) and by number of files (files)."""
    if guard:
        results = run_many([DISK_BOMB] * 2, limits, workers=2, mode=mode)        # two at once, as in training
    else:
        results = [run_program(DISK_BOMB, limits, mode=mode, guard=False)]
    for result in results:
        written = result.stdout.count("MB written")
        assert stopped_by in result.stdout + result.stderr and written <= most, result


# Issue #18, class 3: special files, which os.mkfifo and os.mknod make without any audit event.
SPECIAL_FILES = {
    "os.mkfifo": "os.mkfifo({path!r})",
    "posix.mkfifo": "import posix\nposix.mkfifo({path!r})",
    "os.mknod, a FIFO": "os.mknod({path!r}, stat.S_IFIFO | 0o600)",
    "os.mknod, a device": "os.mknod({path!r}, stat.S_IFCHR | 0o600, os.makedev(1, 3))",
    "a device in the working directory": "os.mknod('null', stat.S_IFCHR | 0o600, os.makedev(1, 3))\n"
                                         "open('null', 'w').write('through a device')",
}


@pytest.mark.parametrize("mode, guard", MODES + KERNEL)
def test_no_special_files(tmp_path, mode, guard):
    for name, program in SPECIAL_FILES.items():
        result = run_program("import os, stat\n" + program.format(path=str(tmp_path / "special")), FAST, mode=mode,
                             guard=guard)
        assert not result.passed, (name, result)
        assert list(tmp_path.iterdir()) == [], name


@pytest.mark.parametrize("mode, guard", KERNEL)
def test_the_namespaces_alone_hold_the_network_the_processes_and_the_file_system(mode, guard):
    """What the kernel holds in the namespace modes, with the in-process guard left out."""
    program = """import ctypes, errno, json, os, socket, stat
libc = ctypes.CDLL(None, use_errno=True)
def failure(result):
    return os.strerror(ctypes.get_errno()) if result != 0 else "done"
facts = {"interfaces": socket.if_nameindex(), "proc": os.listdir("/proc"),
         "umount /proc": failure(libc.umount2(b"/proc", 2)), "user namespace": failure(libc.unshare(0x10000000)),
         "work MB": os.statvfs(".").f_blocks * os.statvfs(".").f_frsize // 2**20}
for name, action in [("mknod", lambda: os.mknod("null", stat.S_IFCHR | 0o600, os.makedev(1, 3))),
                     ("connect", lambda: socket.create_connection(("1.1.1.1", 53), timeout=1)),
                     ("write /etc", lambda: open("/etc/t2-sandbox", "w")), ("fork", os.fork)]:
    try:
        action()
        facts[name] = "done"
    except OSError as e:
        facts[name] = e.strerror
print(json.dumps(facts))
"""
    result = run_program(program, Limits(timeout_s=5, disk_mb=8), mode=mode, guard=False)
    assert result.passed, result
    facts = json.loads(result.stdout)
    assert facts["interfaces"] == [[1, "lo"]] and facts["connect"] == "Network is unreachable"
    assert facts["proc"] == [] and facts["umount /proc"] == "Operation not permitted"
    assert facts["user namespace"] in ("Operation not permitted", "No space left on device")
    assert facts["mknod"] == "Operation not permitted" and facts["write /etc"] == "Read-only file system"
    assert facts["fork"] == "Resource temporarily unavailable" and facts["work MB"] == 8


def sandbox_processes(marker, within=0.0):
    """pid: (argv, real uid) of every process on this machine whose command line holds `marker`; with
    `within`, the ones still there after up to that many seconds (a namespace dies asynchronously)."""
    deadline = time.perf_counter() + within
    while True:
        found = _processes(marker)
        if not found or time.perf_counter() > deadline:
            return found
        time.sleep(0.05)


def _processes(marker):
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if any(marker in arg for arg in argv) and pid != str(os.getpid()):
            found[int(pid)] = (argv, uid)
    return found


# Issue 29, class 3: the namespace's root was the host's root when the harness ran as root.
@pytest.mark.parametrize("mode, guard", KERNEL)
def test_the_program_never_runs_as_the_hosts_root(mode, guard):
    limits = Limits(timeout_s=10, memory_mb=1029)                  # 1029: to find the child on this machine
    done = threading.Event()
    thread = threading.Thread(target=lambda: (run_program("import time\ntime.sleep(3)", limits, mode=mode,
                                                          guard=False), done.set()))
    thread.start()
    children = {}
    while not done.is_set() and not children:
        children = {pid: uid for pid, (argv, uid) in sandbox_processes("memory_mb=1029").items()
                    if argv[0] == sys.executable and argv[3] == sandbox.CHILD}
        time.sleep(0.05)
    thread.join()
    assert children, "the sandbox's child was never seen"
    expected = sandbox.SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    assert set(children.values()) == {expected}


# Issue 29, class 1: a second copy of a built-in or extension module brought back every function the
# guard disabled (mkfifo, mknod and the process spawner raise no audit event at all).
COPY = ("import importlib.machinery, importlib.util, os\n"
        "def fresh(name):\n"
        "    finder = importlib.machinery.BuiltinImporter if name == 'posix' else importlib.machinery.PathFinder\n"
        "    spec = finder.find_spec(name)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    return module\n"
        "def spawn(*argv, new_session=False):   # subprocess.Popen without its audit event (Python 3.11)\n"
        "    r, w = os.pipe()\n"
        "    return fresh('_posixsubprocess').fork_exec([os.fsencode(a) for a in argv], [os.fsencode(argv[0])], True,\n"
        "        (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, new_session, -1, -1, None, -1, -1, None, True)\n")
COPIES = {
    "mkfifo": COPY + "fresh('posix').mkfifo('{dir}/fifo')",
    "mknod": COPY + "import stat\nfresh('posix').mknod('{dir}/fifo', stat.S_IFIFO | 0o600)",
    "a spawned process writes outside": COPY + "spawn('/bin/sh', '-c', 'echo > {dir}/spawned')\n"
                                        "import time\ntime.sleep(0.5)",
    "a disabled function kept by some module": """import sys, types
disabled = {("posix", "mkfifo"), ("posix", "mknod"), ("posix", "fork"), ("posix", "pidfd_open"),
            ("_posixsubprocess", "fork_exec"), ("_signal", "signal")}
found = [(m, k) for m, module in list(sys.modules.items()) if isinstance(module, types.ModuleType)
         for k, v in list(vars(module).items())
         if isinstance(v, types.BuiltinFunctionType) and (getattr(v, "__module__", None), v.__name__) in disabled]
print(found)
assert found""",
}


@pytest.mark.parametrize("mode, guard", MODES + KERNEL)
def test_a_second_copy_of_a_module_brings_back_nothing(tmp_path, mode, guard):
    for name, program in COPIES.items():
        result = run_program(program.replace("{dir}", str(tmp_path)), FAST, mode=mode, guard=guard)
        assert list(tmp_path.iterdir()) == [], name
        if guard:
            assert not result.passed, (name, result)


# Issue 29, class 2: the guard's path check raced by a signal handler: `s` leads into the working
# directory while `x` is a link to a deep directory, and out of it (to canary.txt, next to the job
# directory) while `x` is a plain one; the handler swaps them while the hook resolves `s`.
RACE = COPY + """import signal
px = fresh("posix")
os.makedirs("a/b/c")
os.mkdir("x.dir")
os.symlink("a/b/c", "x")
os.symlink("x/../../../canary.txt", "s")
flips = [0]
def flip(*_):
    flips[0] += 1
    try:
        if flips[0] % 2:
            px.rename("x", "x.link"); px.rename("x.dir", "x")
        else:
            px.rename("x", "x.dir"); px.rename("x.link", "x")
    except OSError:
        pass
signal.signal(signal.SIGALRM, flip)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
for _ in range(3000):
    try:
        with open("s", "a") as f:
            f.write("gone")
    except OSError:
        pass
signal.setitimer(signal.ITIMER_REAL, 0)
"""


@pytest.mark.parametrize("mode, guard", MODES + KERNEL)
def test_no_race_or_link_writes_outside(tmp_path, monkeypatch, mode, guard):
    """The canary is where `s` leads when the job directory is in tmp_path (namespaces, guard); bwrap's
    working directory is /tmp/work, so there the canary is written by its absolute path as well."""
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))
    canary = tmp_path / "canary.txt"
    canary.write_text("precious")
    direct = f"\nopen({str(canary)!r}, 'a').write('gone')\n"
    result = run_program(RACE + direct, Limits(timeout_s=10, cpu_s=10), mode=mode, guard=guard)
    assert canary.read_text() == "precious", result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]        # and the job directory is gone


# Issue 29, class 4: a pass forged in pure Python. The completion signal is the child's token, written
# twice to a pipe: these try to write it without knowing it, to learn it, or to have main() write it.
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
    yield from gc.get_objects()
fd = int(sys.argv[4])
for s in {s for s in strings() if isinstance(s, (str, bytes)) and len(s) == 32}:
    os.write(fd, s if isinstance(s, bytes) else s.encode())
os._exit(0)
""" + TESTS,
    "the token from the hook's frame": """import os, sys
try:
    open("/proc/self/environ")
except PermissionError as e:
    tb = e.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    token = tb.tb_frame.f_locals["token"]
    os.write(int(sys.argv[4]), token)
    os.write(int(sys.argv[4]), token)
os._exit(0)
""" + TESTS,
    "a spawned process writes the signal": COPY + "import sys\nspawn('/bin/sh', '-c', 'printf done > ../done')\n"
                                           "import time\ntime.sleep(0.5)\nos._exit(0)" + TESTS,
    "raise the signal's event": "import sys\nsys.audit('t2.sandbox.done')\nimport os\nos._exit(0)" + TESTS,
    "the child's main() again": """import __main__, io, os, sys, types
sys.stdin = io.TextIOWrapper(io.BytesIO(b"pass"))   # a program that returns at once, run by a second main()
names = dict(vars(__main__), set_limits=lambda limits: None, confine=lambda *a: None)
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


@pytest.mark.parametrize("mode, guard", MODES)
def test_a_forged_pass_fails(mode, guard):
    for name, program in FORGERS.items():
        result = run_program(program, FAST, mode=mode)
        assert not result.passed, (name, result)


def test_a_callback_in_the_frame_of_main_on_another_line_is_refused():
    """A weakref callback runs in whatever frame is current: here main()'s, on its `return 1`
    line, when the exception that holds the token dies. The hook looks at the line, not only the frame."""
    program = """import builtins, functools, sys, weakref
class Token:
    pass
def fail():
    token = Token()
    builtins.keep = weakref.ref(token, functools.partial(sys.audit, "t2.sandbox.done"))
    raise Exception(token)
fail()
"""
    result = run_program(program, FAST, mode="guard")
    assert not result.passed and "t2.sandbox.done is the completion signal" in result.stderr, result


def test_without_the_guard_the_forgers_would_pass():
    """The control for the test above: a trace function does jump over the tests once the guard is gone."""
    jump = run_program(FORGERS["a trace function jumps over the tests"], FAST, mode="guard", guard=False)
    assert jump.passed and jump.stdout == "the tests were jumped over\n"


def test_the_completion_signal_is_the_last_line_of_main():
    """The audit hook takes the signal only from the last line of main(): that line must be the one."""
    from data import _sandbox_child as child
    lines, first = inspect.getsourcelines(child.main)
    assert child.last_line(child.main.__code__) == first + len(lines) - 1
    assert "sys.audit(DONE)" in lines[-1]


# Issue 29, class 5: processes. A bounded bomb ran 20 at once; in guard mode a process in its own
# session that ignores SIGTERM outlived run_program; pidfd_open and pidfd_send_signal (no audit event)
# killed a process of the harness.
PROCESSES = {
    "a bomb": "import os, time\nfor _ in range(20):\n    if os.fork() == 0:\n        time.sleep(2)\n        os._exit(0)",
    "a bomb of second copies": COPY + "for _ in range(20):\n    spawn('/bin/sleep', '2.25')",
    "a session that ignores SIGTERM": COPY + "spawn('/bin/sh', '-c', 'trap \"\" TERM; sleep 2.25', new_session=True)",
    "a thread": "import threading, time\nthreading.Thread(target=time.sleep, args=(2.25,)).start()",
    "pidfd": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)",
    "pidfd of a second copy": COPY + "import signal\nsignal.pidfd_send_signal(fresh('posix').pidfd_open({pid}), 9)",
}


@pytest.mark.parametrize("mode, guard", MODES + KERNEL)
def test_nothing_but_the_program_runs_and_nothing_of_the_harness_is_touched(mode, guard):
    limits = Limits(timeout_s=3, cpu_s=3, memory_mb=1031)                  # 1031: to find its processes
    harness = subprocess.Popen(["sleep", "30"])                             # a process of the harness
    try:
        for name, program in PROCESSES.items():
            result = run_program(program.format(pid=harness.pid), limits, mode=mode, guard=guard)
            assert sandbox_processes("2.25", within=1) == sandbox_processes("memory_mb=1031", within=1) == {}, name
            assert harness.poll() is None, (name, result)
            if guard:
                assert not result.passed, (name, result)
    finally:
        harness.kill()


# Issue 29, class 6: numpy could not be imported (the guard disabled os.putenv).
@pytest.mark.parametrize("mode, guard", MODES)
def test_numpy_works(mode, guard):
    result = run_program("import numpy as np\nassert np.linalg.solve([[2.0]], [4.0])[0] == 2.0\n", mode=mode)
    assert result.passed, result


def test_the_mode_is_chosen_once_warned_about_and_can_be_forced(monkeypatch):
    monkeypatch.setenv("T2_SANDBOX", "guard")
    assert default_mode() == "guard"
    monkeypatch.setenv("T2_SANDBOX", "chroot")
    with pytest.raises(ValueError, match="T2_SANDBOX must be one of"):
        default_mode()
    monkeypatch.setattr(sandbox, "mode_problem", lambda mode: None if mode == "guard" else f"no {mode} here")
    monkeypatch.setenv("T2_SANDBOX", "namespaces")
    with pytest.raises(RuntimeError, match="no namespaces here"):
        default_mode()
    monkeypatch.delenv("T2_SANDBOX")
    sandbox._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="in-process guard alone .bwrap: no bwrap here; unshare: no namespaces"):
        assert default_mode() == "guard"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_mode() == "guard"                     # warned once only
    monkeypatch.setattr(sandbox, "mode_problem", lambda mode: "no bwrap here" if mode == "bwrap" else None)
    assert default_mode() == "namespaces"                    # the first that works


@pytest.mark.parametrize("mode, guard", MODES)
def test_working_directory_is_private_writable_and_removed(tmp_path, monkeypatch, mode, guard):
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))
    program = ("import os\nprint(os.getcwd(), os.environ['HOME'])\nopen('scratch.txt', 'w').write('ok')\n"
               "assert open('scratch.txt').read() == 'ok'\n")
    result = run_program(program, mode=mode)
    assert result.passed, result
    work_dir, home = result.stdout.split()
    assert os.path.basename(work_dir) == "work" and home == work_dir and list(tmp_path.iterdir()) == []


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
@pytest.mark.parametrize("mode, guard", MODES)
def test_canonical_solutions_pass(mode, guard, monkeypatch):
    """All 974 MBPP and all 164 HumanEval canonical solutions pass: 100.0% (974/974, 164/164), in
    every mode. About a minute a mode on 2 cores; MBPP 123 alone takes 5 s of CPU, within the 15 s
    default limits. (benchmarks/bench_sandbox.py times them in each mode.)"""
    monkeypatch.setenv("T2_SANDBOX", mode)
    mbpp = get_task("mbpp", data_dir=DATA)
    problems = [mbpp.example(r) for r in mbpp.read("mbpp/mbpp.jsonl")]          # all ids, 1-974
    passed = mbpp.score_many(problems, [ex.answer for ex in problems])
    assert [ex.id for ex, ok in zip(problems, passed) if not ok] == [] and len(problems) == 974
    humaneval = get_task("humaneval", prompt="complete", data_dir=DATA)
    problems = humaneval.load("test")
    passed = humaneval.score_many(problems, [ex.answer for ex in problems])
    assert [ex.id for ex, ok in zip(problems, passed) if not ok] == [] and len(problems) == 164


# Issue 39, class 1: one job read another's program (its tests) and output, in namespaces mode, through
# the host's /tmp. Two programs run at once; each looks for the other's files, for up to a second,
# in /tmp and in `shared` (a folder every sandbox can see, where the job folders are put in the second
# case: then the job folders' modes alone keep them apart). Guard mode is the control: it sees them.
PEEK = """# {me}
import os, time
ME, OTHER = "SECRET-" + "{m}", "SECRET-" + "{o}"
print(ME, "is running")
found, listed, end = [], set(), time.time() + 1.0
while len(set(found)) < 2 and time.time() < end:
    for parent in ("/tmp", {shared!r}):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        listed.update(parent + "/" + name for name in names)
        for name in names:
            for what in ("program.py", "stdout"):
                try:
                    with open(os.path.join(parent, name, what)) as f:
                        if OTHER in f.read():
                            found.append(what)
                except OSError:
                    pass
    time.sleep(0.02)
print("found:", sorted(set(found)), "in /tmp:", sorted(p for p in listed if p.startswith("/tmp/")))
"""


def run_two_at_once(programs, mode, guard):
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, run_program(programs[i], Limits(timeout_s=10), mode=mode, guard=guard))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("where", ["/tmp", "a shared folder"])
@pytest.mark.parametrize("mode, guard", KERNEL + [in_mode("guard")])
def test_jobs_never_see_each_other(tmp_path, monkeypatch, where, mode, guard):
    shared = "/nowhere"
    if where != "/tmp":
        if os.geteuid() != 0 and mode != "guard":
            pytest.skip("a harness that is not root runs every job as its own user: only the private /tmp "
                        "keeps them apart")
        shared = tempfile.mkdtemp(prefix="t2-test-jobs-", dir="/var/tmp")     # outside /tmp, seen by the jobs
        os.chmod(shared, 0o755)
        monkeypatch.setattr(sandbox.tempfile, "tempdir", shared)
    try:
        a, b = run_two_at_once([PEEK.format(me="SECRET-A", m="A", o="B", shared=shared),
                                PEEK.format(me="SECRET-B", m="B", o="A", shared=shared)], mode, guard)
    finally:
        if shared != "/nowhere":
            shutil.rmtree(shared)
    for result in (a, b):
        assert result.passed and "is running" in result.stdout, result
    if mode == "guard":                                  # the control: the same programs do see each other
        assert "found: ['program.py', 'stdout']" in a.stdout + b.stdout, (a, b)
    else:
        for result in (a, b):
            assert "found: [] in /tmp: ['/tmp/work']" in result.stdout, result


# Issue 39, class 2: 20,000 files, which sqlite3 makes without any `open` audit event (the guard's
# count never saw them) in bwrap's working directory (a tmpfs bounded in bytes, not in files).
FLOODS = {
    "sqlite3": "import sqlite3\nfor i in range(20000):\n    sqlite3.connect(f'{i}.db').execute('create table t (x)')",
    "open": "for i in range(20000):\n    open(f'{i}', 'w').close()",
}


@pytest.mark.parametrize("mode, guard", KERNEL + [in_mode("guard")])
def test_a_flood_of_files_stops_at_the_cap(mode, guard):
    """The kernel modes without the guard (with it, the guard's count of `open` stops it first), and the guard."""
    limits = Limits(timeout_s=20, cpu_s=20, files=64)
    for name, flood in FLOODS.items():
        program = f"import os\ntry:\n    {flood.replace(chr(10), chr(10) + '    ')}\nfinally:\n" \
                  "    print('files:', len(os.listdir('.')))"
        result = run_program(program, limits, mode=mode, guard=guard)
        assert not result.passed, (name, result)
        if mode == "guard" and name == "sqlite3":
            assert "module _sqlite3 is not allowed in guard mode" in result.stderr, result
        elif mode == "guard":
            assert "a program may create at most 64 files" in result.stderr, result
        else:                                            # the tmpfs: 64 inodes, its root one of them
            assert int(result.stdout.split("files:")[1]) <= 64, (name, result)
            assert ("No space left on device" if name == "open" else "sqlite3.OperationalError") in result.stderr


# Issue 39, class 3: in guard mode, sqlite3 wrote files outside the working directory, _posixshmem made,
# truncated and removed files in /dev/shm, fcntl's F_SETOWN/F_SETSIG/O_ASYNC sent signals without kill(),
# listen() bound an unbound socket, a netlink dump listed the host's interfaces, and /proc/self/root/
# walked around "/proc is not readable"; and (found since) any extension module from site-packages may
# write files with no event. Each must fail in guard mode and do nothing outside in any mode.
NETLINK_DUMP = """import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
s.send(struct.pack("=IHHII", 32, 18, 0x301, 1, 0) + bytes(16))     # RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP
links, done = 0, False
while not done:
    data = s.recv(65536)
    while data:
        length, kind = struct.unpack_from("=IH", data)
        links, done, data = links + (kind == 16), done or kind == 3, data[(length + 3) & ~3:]
print("interfaces:", links)
"""
GUARD_MODE_CLASSES = {
    "sqlite3 connect": "import sqlite3\nsqlite3.connect('{dir}/a.db').execute('create table t (x)')",
    "sqlite3 VACUUM INTO": "import sqlite3\nsqlite3.connect(':memory:').execute(\"VACUUM INTO '{dir}/b.db'\")",
    "sqlite3 ATTACH": "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute(\"ATTACH '{dir}/c.db' AS c\")\n"
                      "c.execute('create table c.t (x)')",
    "shm_open": "import _posixshmem, os\nfd = _posixshmem.shm_open('/{shm}-new', os.O_CREAT | os.O_RDWR, 0o600)",
    "shm_unlink the harness's": "import _posixshmem\n_posixshmem.shm_unlink('/{shm}')",
    "F_SETOWN, F_SETSIG, O_ASYNC": "import fcntl, os\nfor who in ({pid}, -{pid}):\n    r, w = os.pipe()\n"
                                   "    fcntl.fcntl(r, fcntl.F_SETOWN, who)\n    fcntl.fcntl(r, 10, 9)   # F_SETSIG\n"
                                   "    fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\n    os.write(w, b'x')\n"
                                   "import time\ntime.sleep(0.2)",
    "listen() binds": "import socket\ns = socket.socket()\ns.listen()\nprint('listening on', s.getsockname())",
    "a netlink dump": NETLINK_DUMP,
    "native code that writes without events (tiktoken's stands in for safetensors')": "import tiktoken._tiktoken",
    "/proc/self/root": "import os\nprint(os.listdir('/proc/self/root/'))\n"
                       "print(open('/proc/self/root/etc/hostname').read())",
}


@pytest.mark.parametrize("mode, guard", MODES)
def test_guard_mode_closes_what_raises_no_event_and_the_kernel_modes_hold(tmp_path, mode, guard):
    shm = f"t2-test-{os.getpid()}-{mode}"
    with open(f"/dev/shm/{shm}", "w") as f:              # a file of the harness in /dev/shm
        f.write("precious")
    harness = subprocess.Popen(["sleep", "30"], start_new_session=True)   # and a process, its own group
    try:
        for name, program in GUARD_MODE_CLASSES.items():
            result = run_program(program.format(dir=tmp_path, shm=shm, pid=harness.pid), FAST, mode=mode)
            assert list(tmp_path.iterdir()) == [] and harness.poll() is None, (name, result)
            assert open(f"/dev/shm/{shm}").read() == "precious" and not os.path.exists(f"/dev/shm/{shm}-new"), name
            if mode == "guard":
                assert not result.passed and "sandbox: " in result.stderr, (name, result)
            elif name == "a netlink dump":
                assert result.stdout == "interfaces: 1\n", result          # its own network namespace: lo
    finally:
        harness.kill()
        for path in (f"/dev/shm/{shm}", f"/dev/shm/{shm}-new"):
            if os.path.exists(path):
                os.remove(path)


def test_run_many_in_guard_mode_warns_once_what_that_means():
    sandbox._warn_many.cache_clear()
    with pytest.warns(RuntimeWarning, match="run_many in guard mode: every program runs as .* guard alone"):
        assert [r.passed for r in run_many(["pass", "assert False"], FAST, workers=2, mode="guard")] == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_many(["pass"], FAST, mode="guard")                          # once only


# Issue 39, class 4: in bwrap mode a program with native code could PTRACE_SEIZE the namespace's first
# process (bwrap's, the same user's) and read its memory with process_vm_readv; bwrap's seccomp filter
# (_seccomp.py) refuses them. In namespaces mode that process kept its capabilities: the kernel refuses.
PTRACE = """import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(result):
    return os.strerror(ctypes.get_errno()) if result == -1 else "done"
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
here, there = iovec(ctypes.cast(buf, ctypes.c_void_p), 8), iovec(0x10000, 8)
libc.process_vm_readv.restype = ctypes.c_ssize_t
print({"seize": errno_of(libc.ptrace(0x4206, 1, 0, 0)),
       "process_vm_readv": errno_of(libc.process_vm_readv(1, ctypes.byref(here), 1, ctypes.byref(there), 1, 0)),
       "pidfd_getfd": errno_of(libc.syscall(438, os.pidfd_open(1), 0, 0))})
"""


@pytest.mark.parametrize("mode, guard", KERNEL)
def test_the_program_cannot_trace_the_namespaces_first_process(mode, guard):
    result = run_program(PTRACE, FAST, mode=mode, guard=False)
    assert result.passed, result
    refused = "Operation not permitted"
    assert eval(result.stdout) == {"seize": refused, "process_vm_readv": refused, "pidfd_getfd": refused}, result


def run_filter(program, arch, nr):
    """What the kernel would return for a call `nr` of ABI `arch`: classic BPF, the few opcodes used."""
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:                                       # BPF_LD | BPF_W | BPF_ABS
            acc = {0: nr, 4: arch}[k]
        elif op in (0x15, 0x35):                             # BPF_JEQ, BPF_JGE
            pc += jt if (acc == k if op == 0x15 else acc >= k) else jf
        else:
            assert op == 0x06                                # BPF_RET
            return k
        pc += 1


@pytest.mark.parametrize("machine", sorted(_seccomp.SYSCALLS))
def test_the_seccomp_filter_denies_tracing_and_nothing_else(machine):
    arch, numbers = _seccomp.SYSCALLS[machine]
    program = _seccomp.filter_program(machine)
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    assert [run_filter(program, arch, nr) for nr in sorted(numbers.values())] == [eperm] * len(numbers)
    assert [run_filter(program, arch, nr) for nr in range(0, 460) if nr not in numbers.values()] == [allow] * (460 - 4)
    assert run_filter(program, 0x40000003, 26) == eperm                        # another ABI (i386's ptrace)
    if machine == "x86_64":
        assert run_filter(program, arch, 0x40000000 | 101) == eperm            # x32's
    assert _seccomp.filter_program("sparc") is None


# A harness that is not root (CI's is): bwrap mode's first stage then runs in a user namespace of its
# own, and bwrap maps the harness's user back. Run here as SANDBOX_UID, with an interpreter it can run.
NOT_ROOT = """import json, os, sys
sys.path.insert(0, sys.argv[1])
from data.sandbox import Limits, run_program
probe = '''import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
print(json.dumps([os.getuid(), os.listdir("/tmp"), os.statvfs(".").f_files, libc.ptrace(0x4206, 1, 0, 0),
                  libc.mount(b"t2", b"/tmp/work", b"tmpfs", 0, None), os.path.exists(sys_argv_1)]))'''
facts = {}
for mode in ("bwrap", "namespaces"):
    result = run_program(probe.replace("sys_argv_1", repr(sys.argv[2])), Limits(timeout_s=10, files=9), mode=mode,
                         guard=False)
    facts[mode] = json.loads(result.stdout) if result.passed else result.stderr
print(json.dumps([os.getuid(), facts]))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                    reason="needs root, to become another user")
def test_a_harness_that_is_not_root_gets_the_same(tmp_path):
    python = sys.executable if not sandbox.hidden_paths() else "/usr/bin/python3"   # one that others may run
    become = ["setpriv", f"--reuid={sandbox.SANDBOX_UID}", f"--regid={sandbox.SANDBOX_UID}", "--clear-groups", "--"]
    if subprocess.run([*become, python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import data.sandbox", ROOT],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{sandbox.SANDBOX_UID} cannot run {python} or import {ROOT}/data")
    secret = tmp_path / "secret"                          # the harness's: under a folder closed to others
    secret.write_text("x")
    out = subprocess.run([*become, python, "-c", NOT_ROOT, ROOT, str(secret)], capture_output=True, text=True,
                         timeout=60)
    uid, facts = json.loads(out.stdout)
    refused = -1                 # (namespaces: the harness's user is root in the namespace, with no capability)
    assert uid == sandbox.SANDBOX_UID and facts == {"bwrap": [uid, ["work"], 10, refused, refused, False],
                                                    "namespaces": [0, ["work"], 10, refused, refused, False]}, \
        (facts, out.stderr)


@pytest.mark.parametrize("userns", [True, False])
def test_bwrap_mode_for_a_harness_that_is_not_root(tmp_path, monkeypatch, userns):
    """Its first stage mounts the capped tmpfs in a user namespace of its own; where it may not make one
    (userns_mounts() False: Ubuntu 24.04's AppArmor), bwrap's own tmpfs is used, bounded in bytes only."""
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "userns_mounts", lambda: userns)
    os.mkdir(tmp_path / "work")
    argv = sandbox.command("bwrap", Limits(files=9, disk_mb=5), str(tmp_path / "work"), 5, seccomp_fd=7)
    tools = [os.path.basename(a) for a in argv if a.startswith("/") and os.path.basename(a) in ("unshare", "setpriv",
                                                                                                "bwrap")]
    assert argv[argv.index("--seccomp") + 1] == "7" and "setpriv" not in tools
    if userns:
        assert tools == ["unshare", "bwrap"] and argv[1:3] == ["--user", "--map-root-user"]
        assert (tmp_path / "fstab").read_text() == \
            "t2-sandbox /tmp tmpfs size=5m,nr_inodes=10,mode=700,nosuid,nodev,noexec 0 0\n"
        assert argv[argv.index("--bind") + 1:][:2] == ["/tmp", sandbox.WORK] and "--cap-drop" in argv
    else:
        assert tools == ["bwrap"] and not (tmp_path / "fstab").exists()
        assert argv[argv.index("--size") + 1:][:3] == [str(5 * 2**20), "--tmpfs", sandbox.WORK]
