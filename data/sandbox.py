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
directories (hidden_paths(), view()), and drops to SANDBOX_UID with setpriv before the namespaces.
In bwrap mode that first stage (in a user namespace of its own where the harness is not root) also
mounts the working directory's tmpfs: bwrap's options cannot bound its number of files.

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
import shlex
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

from ._seccomp import filter_program

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
MODES = ("bwrap", "namespaces", "guard")
SANDBOX_UID = 65534             # "nobody": whom a root harness runs programs as, in the namespace modes
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
    """The command line that runs the child in `mode`, after writing the first stage's mounts, if any
    (first_stage()), to job_dir/fstab: `mount --all --fstab` makes them all, in order, in one process."""
    child = [sys.executable, "-I", "-B", CHILD, mode, "guard" if guard else "unguarded", str(signal_fd),
             *(f"{key}={value}" for key, value in asdict(limits).items() if key != "timeout_s")]
    if mode == "guard":
        return child
    root = os.geteuid() == 0
    if mode == "namespaces":
        inner = [*UNSHARE, *child]
    else:
        seccomp = ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
        # (not root: the first stage maps the harness's user to root; bwrap maps it back, with no capability)
        inner = [*BWRAP, *([] if root else ["--uid", str(os.getuid()), "--gid", str(os.getgid()), "--cap-drop", "ALL"]),
                 "--bind", "/tmp", WORK, "--chdir", WORK, *seccomp, "--", *child]
    mounts = first_stage(mode, limits, os.path.dirname(work_dir), root)
    first = []
    if mounts:
        fstab = os.path.join(os.path.dirname(work_dir), "fstab")
        with open(fstab, "w", encoding="utf-8", opener=_private) as f:
            f.write("".join(" ".join(map(_fstab_field, fields)) + " 0 0\n" for fields in mounts))
        first = ["unshare", *([] if root else ["--user", "--map-root-user"]), "--mount", "--propagation", "private",
                 "--", "/bin/sh", "-c", f'mount --all --fstab {shlex.quote(fstab)} && exec "$@"', "sh"]
    return _located([*first, *(SETPRIV if root else []), *inner])


def first_stage(mode, limits, job_dir, root):
    """The mounts (fstab fields: what, where, type, options) of a first stage, in a mount namespace
    of its own, before the sandbox's namespaces: for a root harness, view(); in bwrap mode, the working
    directory's tmpfs, which bwrap binds on WORK (its options cannot bound a tmpfs's number of files),
    made in a user namespace of its own where the harness is not root. Neither the host nor another
    job ever sees these mounts. The tmpfs: at most disk_mb MB and `files` files and directories (the
    kernel counts inodes, however they are made: sqlite3, native code), noexec, on /tmp (covered by
    bwrap's own /tmp)."""
    mounts = view(job_dir) if root else []
    if mode == "bwrap":
        owner = f",uid={SANDBOX_UID},gid={SANDBOX_UID}" if root else ""
        mounts.append(("t2-sandbox", "/tmp", "tmpfs", f"size={limits.disk_mb}m,nr_inodes={limits.files + 1},"
                                                      f"mode=700,nosuid,nodev,noexec{owner}"))
    return mounts


def _fstab_field(text):
    return text.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def _located(args):
    """The tools by their full paths: the child's PATH (scrubbed_env) may not hold them."""
    return [(shutil.which(a) or a) if a in ("bwrap", "unshare", "setpriv") else a for a in args]


def searchable(path, uid=SANDBOX_UID, gid=SANDBOX_UID):
    """Whether `uid` (in group `gid` only) may enter the directory `path`, by its mode bits."""
    st = os.stat(path)
    return bool(st.st_mode & (0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001))


@functools.lru_cache(maxsize=None)
def hidden_paths():
    """{directory SANDBOX_UID cannot enter: [the interpreter's directories below it]}: what a root
    harness must show the sandbox's user, e.g. {"/root": ["/root/.pyenv/versions/3.11.7"]}."""
    needed = {os.path.realpath(p) for p in [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
                                            os.path.dirname(CHILD), os.path.dirname(os.path.realpath(sys.executable)),
                                            *sys.path] if p and os.path.isdir(p)}
    hidden = {}
    for path in sorted(needed):
        parts = path.split("/")
        blocked = next((d for d in ("/".join(parts[:i]) for i in range(2, len(parts))) if not searchable(d)), None)
        if blocked is not None:                      # (a needed directory closed itself cannot be helped)
            hidden.setdefault(blocked, []).append(path)
    return {d: [p for p in ps if not any(p.startswith(q + "/") for q in ps)] for d, ps in hidden.items()}


def view(job_dir):
    """The root-owned first stage's mounts that make hidden_paths() visible to SANDBOX_UID: each
    hidden directory covered with a tmpfs that holds only the interpreter's directories, bound
    read-only (each bound aside into job_dir first, then back; X-mount.mkdir makes the way)."""
    mounts, staged = [], 0
    for covered, paths in hidden_paths().items():
        aside = [f"{job_dir}/view{staged + i}" for i in range(len(paths))]
        mounts += [(path, there, "none", "bind,X-mount.mkdir") for path, there in zip(paths, aside)]
        mounts.append(("t2-view", covered, "tmpfs", "mode=755"))
        mounts += [(there, path, "none", "bind,ro,X-mount.mkdir") for path, there in zip(paths, aside)]
        staged += len(paths)
    return mounts


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


def _private(path, flags):
    return os.open(path, flags, 0o600)           # the job's files: the harness's user's alone


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
        with open(program, "w", encoding="utf-8", opener=_private) as f:
            f.write(source)
        read_end, write_end = os.pipe()
        if mode == "bwrap":
            seccomp_fd = _seccomp_pipe()
        start = time.perf_counter()
        with open(program, "rb") as stdin, open(out_path, "wb", opener=_private) as out, \
                open(err_path, "wb", opener=_private) as err:
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
