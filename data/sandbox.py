"""Running untrusted, model-generated Python programs (the code tasks' tests).

    result = run_program("def f(x):\\n    return x + 1\\nassert f(1) == 2\\n")
    result.passed, result.status       # True, "passed"
    results = run_many(programs)        # in parallel, one process each
    default_mode()                      # "bwrap", "namespaces" or "guard": how programs are isolated here

Every program runs in its own process (`_sandbox_child.py`), which gets the program on stdin (so it
needs no path to it), stdout and stderr as files, a scrubbed environment, limits (wall clock, CPU
seconds, address space, file size, which also caps the output, open files, processes), its own
session, and the in-process guard (an audit hook and disabled functions: see _sandbox_child.py).

Three modes; default_mode() takes the first that works here, T2_SANDBOX=bwrap|namespaces|guard forces one:
- "bwrap": bubblewrap (Debian/Ubuntu package `bubblewrap`, what Flatpak uses) makes the namespaces.
- "namespaces": util-linux's `unshare` makes them, and the child itself mounts and drops its
  capabilities before the program runs (confine() in _sandbox_child.py), to the same effect.
- "guard": the guard alone, as the harness's user; falling back to it warns once, saying why.

What the kernel holds in both namespace modes, whatever the program does in Python:
- it runs as an unprivileged user: the harness's own, or, when the harness is root, SANDBOX_UID
  ("nobody"), never the host's root; with no capabilities, and no way to make a user namespace;
- RLIMIT_NPROC binds that user (root is exempt from it): no process or thread besides the program;
- the root file system is read-only; /tmp is the job's own, empty and read-only, and the working
  directory, /tmp/work in it, a fresh tmpfs of at most Limits.disk_mb MB and Limits.files files
  (the kernel counts inodes however they are made), noexec; the job's folder on the host (program,
  stdout, stderr) is the harness's user's alone (0700, 0600); /proc is empty; /dev is minimal (bwrap)
  or the host's (namespaces), read-only; there is no network;
- it sees no other process, nor another job's files, and its namespace's first process (bwrap's own,
  or a shell) is killed with everything in it when run_program returns; in bwrap mode a seccomp
  filter (_seccomp.py) keeps native code from tracing that process (namespaces: it kept capabilities
  the program lacks, and the kernel refuses).
A root harness's interpreter may live where "nobody" cannot go (pyenv under /root): then a first,
root-owned mount namespace covers each such directory with a tmpfs holding only the interpreter's
directories (hidden_paths()), and drops to SANDBOX_UID with setpriv before the namespaces. In bwrap
mode that first stage (in a user namespace of its own where the harness is not root) also mounts the
working directory's tmpfs: bwrap's options cannot bound its number of files (_first_stage.py).

What holds where, by class of attack, and what guard mode leaves open: data/README.md's table.

A program passes only if it exits with status 0 *and* the child's token arrived twice on the pipe
whose reading end only the harness holds: once before the program runs, once from the last line of
the child's main() after the program returned. Only the child's audit hook knows the token; the
program cannot read it from Python (see _sandbox_child.py for why, and what native code can still do).

Neither mode is a hardened sandbox: there is no cgroup, no seccomp filter but bwrap's against
tracing, and a program can read what its user may read. The limits are set in the child, not in
a `preexec_fn`: the subprocess docs warn that preexec_fn is not safe in the presence of threads, and
run_many launches processes from threads.
"""

import functools
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

from ._first_stage import SANDBOX_UID, first_stage, hidden_paths, located, private, userns_mounts
from ._seccomp import filter_program

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
MODES = ("bwrap", "namespaces", "guard")
TOKEN_BYTES = 32                # the length of the child's token (hex)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 15.0     # wall clock (the slowest canonical MBPP solution, 123, needs 5 s)
    cpu_s: int = 15             # CPU seconds (SIGXCPU, reported as a timeout)
    memory_mb: int = 1024       # address space (MemoryError)
    output_kb: int = 1024       # size of any file written, stdout and stderr included (EFBIG)
    open_files: int = 64
    processes: int = 1          # RLIMIT_NPROC: 1 = nothing besides the program (binds every user but root)
    files: int = 64             # files and directories a program may create (guard; namespaces: tmpfs inodes)
    disk_mb: int = 64           # bwrap, namespaces: size of the tmpfs working directory


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str                 # "passed", "failed" (raised, exited early, stopped), "timeout" (wall or CPU), "killed"
    returncode: int             # negative: the signal that killed it (also in the namespace modes)
    stdout: str                 # the first `keep` characters
    stderr: str
    seconds: float


def scrubbed_env(work_dir):
    """A minimal environment: nothing is inherited from ours. One thread for numpy's BLAS: the
    process limit refuses any other."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work_dir, "TMPDIR": work_dir, "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- command lines

# bwrap, as the unprivileged user: every namespace, the host's root read-only, an empty /proc, a
# minimal /dev and an empty /tmp (all read-only), no user namespaces inside, killed with its parent.
# The working directory, the seccomp filter (_seccomp.py) and the command follow (command()).
BWRAP = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
         "--ro-bind", "/", "/", "--tmpfs", "/proc", "--remount-ro", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
         "--tmpfs", "/tmp", "--dir", "/tmp/work", "--remount-ro", "/tmp"]
WORK = "/tmp/work"              # the working directory, in the job's own empty /tmp (both namespace modes)
# unshare, as the unprivileged user, who is root in the new namespaces until the child's confine().
# The namespace's first process (PID 1) is a shell that runs the child as its own child and waits:
# the kernel spares an init the signals it has no handler for, and the program must not be spared.
# A child killed by signal N makes it exit with 128 + N, which run_program turns back into -N.
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount", "--propagation",
           "private", "--net", "--ipc", "--uts", "--", "/bin/sh", "-c", '"$@"; exit $?', "sh"]
# From root to SANDBOX_UID, with no capability left to keep or gain.
SETPRIV = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--inh-caps=-all",
           "--bounding-set=-all", "--no-new-privs", "--"]


def command(mode, limits, work_dir, signal_fd, guard=True, seccomp_fd=None):
    """The command line that runs the child in `mode`: the first stage, if any (_first_stage.py), then
    setpriv (a root harness), then bwrap or unshare, then the child."""
    child = [sys.executable, "-I", "-B", CHILD, mode, "guard" if guard else "unguarded", str(signal_fd),
             *(f"{key}={value}" for key, value in asdict(limits).items() if key != "timeout_s")]
    if mode == "guard":
        return child
    root = os.geteuid() == 0
    staged = mode == "bwrap" and (root or userns_mounts())          # the first stage mounts the working directory
    if mode == "namespaces":
        inner = UNSHARE
    else:
        seccomp = ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
        if not staged:                           # bwrap's own tmpfs: bounded in bytes, not in files
            work = ["--size", str(limits.disk_mb * 2**20), "--tmpfs", WORK]
        elif root:
            work = ["--bind", "/tmp", WORK]
        else:   # the first stage maps the harness's user to root; bwrap maps it back, with no capability
            work = ["--uid", str(os.getuid()), "--gid", str(os.getgid()), "--cap-drop", "ALL", "--bind", "/tmp", WORK]
        inner = [*BWRAP, *work, "--chdir", WORK, *seccomp, "--"]
    first = first_stage(limits, os.path.dirname(work_dir), root, staged)
    return [*located([*first, *(SETPRIV if root else []), *inner]), *child]   # (the child's "bwrap" is its mode)


# ----------------------------------------------------------------------------- running

def _kill(proc):
    """Kills the child's process group, and the child itself in case it left the group. In the
    namespace modes the child is bwrap or unshare: killing it kills the namespace's first process
    (--die-with-parent, --kill-child), and with it every process in the namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass                                     # the group is already gone
    proc.kill()                                  # does nothing once the process has been waited for


def _read(path):
    # at most limits.output_kb: a larger write was refused by RLIMIT_FSIZE
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _seccomp_pipe():
    """A pipe holding the seccomp filter, whose reading end bwrap gets (--seccomp); None where the
    filter is unknown (_seccomp.py)."""
    program = filter_program()
    if program is None:
        return None
    read_end, write_end = os.pipe()
    os.write(write_end, program)                 # a few hundred bytes: within the pipe's buffer
    os.close(write_end)
    return read_end


def _completed(fd):
    """Whether the child's token arrived twice, and nothing else: the completion signal."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) <= 2 * TOKEN_BYTES:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:                  # a writer is still open but wrote nothing more
            break
        if not chunk:
            break
        data += chunk
    return len(data) == 2 * TOKEN_BYTES and data[:TOKEN_BYTES] == data[TOKEN_BYTES:]


def run_program(source, limits=Limits(), keep=4000, mode=None, guard=True):
    """Runs `source` in a fresh sandboxed process; returns a RunResult. mode: one of MODES (default:
    default_mode()). guard=False leaves out the in-process guard (the completion signal stays): only
    for the tests that show what the operating system holds alone."""
    mode = mode or default_mode()
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, found {mode!r}")
    job_dir = tempfile.mkdtemp(prefix="t2-sandbox-")        # 0700: no other job's user may read it
    read_end = seccomp_fd = None
    try:
        work_dir = os.path.join(job_dir, "work")
        os.mkdir(work_dir)
        program, out_path, err_path = (os.path.join(job_dir, name) for name in ("program.py", "stdout", "stderr"))
        with open(program, "w", encoding="utf-8", opener=private) as f:
            f.write(source)
        read_end, write_end = os.pipe()
        if mode == "bwrap":
            seccomp_fd = _seccomp_pipe()
        start = time.perf_counter()
        with open(program, "rb") as stdin, open(out_path, "wb", opener=private) as out, \
                open(err_path, "wb", opener=private) as err:
            try:
                proc = subprocess.Popen(command(mode, limits, work_dir, write_end, guard, seccomp_fd),
                                        cwd=work_dir if mode == "guard" else "/", stdin=stdin, stdout=out, stderr=err,
                                        env=scrubbed_env(work_dir if mode == "guard" else WORK),
                                        start_new_session=True, close_fds=True,
                                        pass_fds=(write_end,) if seccomp_fd is None else (write_end, seccomp_fd))
            finally:
                os.close(write_end)              # the child's copy is the only one left
            try:
                returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
            except subprocess.TimeoutExpired:
                _kill(proc)
                returncode, timed_out = proc.wait(), True
            finally:
                _kill(proc)                      # stray processes, even after a normal exit
        seconds = time.perf_counter() - start
        completed = _completed(read_end)
        stdout, stderr = _read(out_path), _read(err_path)
    finally:
        for fd in (read_end, seccomp_fd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(job_dir, ignore_errors=True)
    if mode != "guard" and returncode > 128:
        returncode = 128 - returncode            # the namespace's first process: 128 + N, killed by signal N
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
    if mode == "guard":
        _warn_many()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits, mode=mode), sources))


# ----------------------------------------------------------------------------- choosing the mode

_lock = threading.Lock()
TOOLS = {"bwrap": ["bwrap", "unshare", "mount"], "namespaces": ["unshare", "mount"]}


@functools.lru_cache(maxsize=None)
def mode_problem(mode):
    """None where `mode` works here, else what is missing (a sentence). Found out once, by running
    a trivial program in that mode."""
    if mode == "guard":
        return None
    if not sys.platform.startswith("linux"):
        return f"namespaces are a Linux feature, and this is {sys.platform}"
    tools = TOOLS[mode] + (["setpriv"] if os.geteuid() == 0 else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    missing += [] if os.path.exists("/bin/sh") else ["/bin/sh"]
    if missing:
        package = "bubblewrap" if mode == "bwrap" else "util-linux"
        return f"{', '.join(missing)} not found (install {package})"
    result = run_program("pass", Limits(timeout_s=30), mode=mode)
    if result.passed:
        return None
    lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
    return f"a trivial program failed in them: {lines[-1]}"


def namespaces_problem():
    """What keeps both namespace modes from working here; None if either works."""
    problems = [mode_problem(mode) for mode in ("bwrap", "namespaces")]
    return None if None in problems else f"bwrap: {problems[0]}; unshare: {problems[1]}"


def default_mode():
    """The sandbox mode: T2_SANDBOX if set (one of MODES), else "bwrap" or "namespaces", the first
    that works here, else "guard" with one warning saying what is missing."""
    forced = os.environ.get("T2_SANDBOX", "")
    if forced not in ("", *MODES):
        raise ValueError(f"T2_SANDBOX must be one of {MODES} or unset, found {forced!r}")
    if forced == "guard":
        return "guard"
    with _lock:                                  # run_many's threads must not probe (or warn) twice
        if forced:
            problem = mode_problem(forced)
            if problem:
                raise RuntimeError(f"T2_SANDBOX={forced}, but that mode does not work here: {problem}")
            return forced
        for mode in ("bwrap", "namespaces"):
            if mode_problem(mode) is None:
                return mode
        _warn_fallback(namespaces_problem())
    return "guard"


@functools.lru_cache(maxsize=None)
def _warn_fallback(problem):
    warnings.warn(f"sandbox: generated code runs without operating-system isolation, under the in-process "
                  f"guard alone ({problem}). No network, process or disk isolation; see data/sandbox.py. "
                  f"Set T2_SANDBOX=guard to choose this mode and silence this warning.",
                  RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _warn_many():
    """Once: what training on (or scoring) generated code with run_many means in guard mode."""
    who = "root" if os.geteuid() == 0 else "the harness's user"
    warnings.warn(f"sandbox: run_many in guard mode: every program runs as {who}, with the in-process guard alone. "
                  f"A program with native code (a CPython or numpy memory bug) escapes it and may do whatever {who} "
                  f"may; any program reads what {who} may read, other jobs' tests and outputs included. "
                  f"See data/README.md's table; train with bwrap or namespaces.", RuntimeWarning, stacklevel=3)
