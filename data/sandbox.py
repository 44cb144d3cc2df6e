"""Running untrusted, model-generated Python programs (the code tasks' tests).

    result = run_program("def f(x):\\n    return x + 1\\nassert f(1) == 2\\n")
    result.passed, result.status       # True, "passed"
    results = run_many(programs)        # in parallel, one process each
    default_mode()                      # "namespaces" or "guard": how programs are isolated here

Every program runs in its own process (`_sandbox_child.py`), which gets:
- a fresh temporary job directory, its `work/` as working directory, HOME and TMPDIR, removed afterwards;
- stdin from /dev/null and a scrubbed environment (no inherited variables, hence no secrets);
- limits: wall-clock timeout, CPU seconds, address space, file size (which also caps its output:
  stdout and stderr go to files, and writing past the limit fails with "File too large"), open files;
- its own session and process group, killed as a whole at the end (os.killpg, then the process itself,
  which may have left its group);
- the in-process guard (an audit hook and disabled functions: see _sandbox_child.py).

Two modes, chosen once per process by default_mode():
- "namespaces" (Linux, with `unshare` from util-linux, as root or where unprivileged user namespaces
  are enabled): the child runs in new user, PID, mount, network and IPC namespaces. It has no network
  (a loopback device that is down), sees only its own processes (a /proc of its own), and its
  working directory is a fresh tmpfs of Limits.disk_mb MB and Limits.files files, gone when the
  program ends; a disk bomb ends in "No space left on device". Its root is the calling user outside
  the namespace: no device files, no mounts or privileges outside. The guard stays inside as a second
  layer. The namespace's first process (PID 1) is a shell that mounts the tmpfs and waits for the
  child: the kernel spares an init the signals it has no handler for, and the program must not be spared.
- "guard" (macOS, kernels that forbid user namespaces, or T2_SANDBOX=guard): the in-process guard alone.
Falling back to "guard" warns once, saying what is missing; T2_SANDBOX=namespaces|guard forces a mode
(namespaces then fails where they cannot be made). The code tasks record the mode in evaluation results.

What holds where ("guard" = the in-process guard: Python-level, so a program written to defeat it, by
native code or a CPython memory bug, gets past it; "OS" = holds even then):
| threat                                   | namespaces              | guard                   |
|------------------------------------------|-------------------------|-------------------------|
| network                                  | OS                      | guard                   |
| other processes: see, signal, /proc/PID  | OS                      | guard                   |
| the harness's environment, via /proc     | OS                      | guard                   |
| disk filled in the working directory     | OS: tmpfs, disk_mb      | guard: files x output_kb|
| files written, special files, elsewhere  | guard (devices: OS)     | guard                   |
| forking (a fork bomb)                    | guard                   | guard (+ RLIMIT_NPROC)  |
| processes left behind                    | OS: die with namespace  | guard (no fork at all)  |
| reading files the user may read          | allowed                 | allowed                 |
| a forged pass                            | see _sandbox_child.py   | same                    |

Neither mode is a hardened sandbox: a program can read whatever its user may read (and print it
into RunResult.stdout), and there is no seccomp filter or cgroup; in guard mode, run it only on a
machine you would let the model's code touch.

A program passes only if it exits with status 0 *and* the child wrote to the FIFO `done` in the job
directory after the program returned (see _sandbox_child.py for why a program cannot write it itself,
and what a program written to deceive can still do). The harness holds the FIFO's reading end; there
is no secret in the child to steal.

The limits are set in the child, not in a `preexec_fn`: the subprocess docs warn that preexec_fn
is not safe in the presence of threads, and run_many launches processes from a thread pool.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
MODES = ("namespaces", "guard")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 15.0     # wall clock (the slowest canonical MBPP solution, 123, needs 5 s)
    cpu_s: int = 15             # CPU seconds (SIGXCPU, reported as a timeout)
    memory_mb: int = 1024       # address space (MemoryError)
    output_kb: int = 1024       # size of any file written, stdout and stderr included (EFBIG)
    open_files: int = 64
    processes: int = 1          # RLIMIT_NPROC; only binds non-root users (the child also forbids fork)
    files: int = 64             # files and directories a program may create (namespaces: tmpfs inodes)
    disk_mb: int = 64           # namespaces: size of the tmpfs working directory


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str                 # "passed", "failed" (raised, exited early), "timeout" (wall or CPU), "killed"
    returncode: int             # negative: the signal that killed it (also in namespace mode)
    stdout: str                 # the first `keep` characters
    stderr: str
    seconds: float


def scrubbed_env(work_dir):
    """A minimal environment: nothing is inherited from ours."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work_dir, "TMPDIR": work_dir,
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# Runs as PID 1 of the new namespaces, in the working directory: mounts the tmpfs over it, steps into
# the mount (leaving the environment as it was), and runs the child as its own child rather than
# exec'ing it (see the module docstring).
# A child killed by signal N makes it exit with 128 + N, which run_program turns back into -N.
INIT = ('options=$1; shift; mount -c -t tmpfs -o "$options" t2-sandbox . && cd ../work && unset PWD OLDPWD'
        ' && "$@"; exit $?')
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc",
           "--net", "--ipc", "--"]


def command(mode, limits, guard=True):
    """The command line that runs the child in `mode`, with the working directory as cwd."""
    child = [sys.executable, "-I", "-B", CHILD, json.dumps(asdict(limits)), "guard" if guard else "unguarded"]
    if mode == "guard":
        return child
    tmpfs = f"size={limits.disk_mb}m,nr_inodes={limits.files + 1},mode=700"   # + 1: its root directory
    return [*UNSHARE, "/bin/sh", "-c", INIT, "sh", tmpfs, *child]


def _kill(proc):
    """Kills the child's process group, and the child itself in case it left the group. In namespace
    mode the child is `unshare`: killing it kills the namespace's init (--kill-child), and with it
    every process in the namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass                                     # the group is already gone
    proc.kill()                                  # does nothing once the process has been waited for


def _read(path):
    # at most limits.output_kb: a larger write was refused by RLIMIT_FSIZE
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _read_done(fd):
    try:
        return os.read(fd, 16) == b"done"
    except BlockingIOError:                      # a writer is still open but wrote nothing
        return False


def run_program(source, limits=Limits(), keep=4000, mode=None, guard=True):
    """Runs `source` in a fresh sandboxed process; returns a RunResult. mode: "namespaces" or "guard"
    (default: default_mode()). guard=False leaves out the in-process guard: only for the tests that show
    what the operating system holds alone."""
    mode = mode or default_mode()
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, found {mode!r}")
    job_dir = tempfile.mkdtemp(prefix="t2-sandbox-")
    done_fd = None
    try:
        work_dir = os.path.join(job_dir, "work")
        os.mkdir(work_dir)
        with open(os.path.join(job_dir, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        os.mkfifo(os.path.join(job_dir, "done"), 0o600)
        # open before the child starts: its end opens without blocking, and only while we read
        done_fd = os.open(os.path.join(job_dir, "done"), os.O_RDONLY | os.O_NONBLOCK)
        out_path, err_path = os.path.join(job_dir, "stdout"), os.path.join(job_dir, "stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(command(mode, limits, guard), cwd=work_dir, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env=scrubbed_env(work_dir),
                                    start_new_session=True, close_fds=True)
            try:
                returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
            except subprocess.TimeoutExpired:
                _kill(proc)
                returncode, timed_out = proc.wait(), True
            finally:
                _kill(proc)                      # stray grandchildren, even after a normal exit
        seconds = time.perf_counter() - start
        completed = _read_done(done_fd)
        stdout, stderr = _read(out_path), _read(err_path)
    finally:
        if done_fd is not None:
            os.close(done_fd)
        shutil.rmtree(job_dir, ignore_errors=True)
    if mode == "namespaces" and returncode > 128:
        returncode = 128 - returncode            # the init shell's 128 + N: killed by signal N
    passed = completed and returncode == 0 and not timed_out
    # Out of time either way: the wall clock ran out, or its CPU seconds did (SIGXCPU, whichever
    # comes first: a busy loop under equal limits may use its CPU seconds before the wall clock's).
    timed_out = timed_out or returncode == -signal.SIGXCPU
    status = ("passed" if passed else "timeout" if timed_out else "killed" if returncode < 0 else "failed")
    return RunResult(passed, status, returncode, stdout[:keep], stderr[-keep:], seconds)


def run_many(sources, limits=Limits(), workers=None, mode=None):
    """Runs many programs, each in its own process, `workers` at a time (default: one per CPU)."""
    workers = workers or os.cpu_count() or 1
    mode = mode or default_mode()                # decided (and warned about) once, not per thread
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits, mode=mode), sources))


_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def namespaces_problem():
    """None where namespace mode works here, else what is missing (a sentence). Found out once, by
    running a trivial program in namespace mode."""
    if not sys.platform.startswith("linux"):
        return f"namespaces are a Linux feature, and this is {sys.platform}"
    if not os.path.exists("/bin/sh") or shutil.which("unshare") is None or shutil.which("mount") is None:
        return "the unshare and mount commands (util-linux) and /bin/sh are needed"
    result = run_program("pass", Limits(timeout_s=30), mode="namespaces")
    if result.passed:
        return None
    lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
    return f"a trivial program failed in them: {lines[-1]}"


def default_mode():
    """The sandbox mode: T2_SANDBOX if set ("namespaces" or "guard"), else "namespaces" where they
    can be made here, else "guard" with one warning saying what is missing."""
    forced = os.environ.get("T2_SANDBOX", "")
    if forced not in ("", *MODES):
        raise ValueError(f"T2_SANDBOX must be one of {MODES} or unset, found {forced!r}")
    if forced == "guard":
        return "guard"
    with _lock:                                  # run_many's threads must not probe (or warn) twice
        problem = namespaces_problem()
    if problem and forced == "namespaces":
        raise RuntimeError(f"T2_SANDBOX=namespaces, but namespaces cannot be made here: {problem}")
    if problem:
        _warn_fallback(problem)
        return "guard"
    return "namespaces"


@functools.lru_cache(maxsize=None)
def _warn_fallback(problem):
    warnings.warn(f"sandbox: generated code runs without operating-system isolation, under the in-process "
                  f"guard alone ({problem}). No network, process or disk isolation; see data/sandbox.py. "
                  f"Set T2_SANDBOX=guard to choose this mode and silence this warning.",
                  RuntimeWarning, stacklevel=3)
