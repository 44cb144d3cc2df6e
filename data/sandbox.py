"""Running untrusted, model-generated Python programs (the code tasks' tests).

    result = run_program("def f(x):\\n    return x + 1\\nassert f(1) == 2\\n")
    result.passed, result.status       # True, "passed"
    results = run_many(programs)        # in parallel, one process each

NOT A SECURITY BOUNDARY. This sandbox protects against the accidents of generated code (infinite
loops, huge allocations, deleting files, runaway output, stray processes), not against an
adversary: a determined program can escape an in-process guard. Do not run it on a machine that
holds secrets you would not hand to the model.

Each program runs in its own process (`_sandbox_child.py`, see its docstring for the in-process
guards), which gets:
- a fresh temporary directory as working directory, HOME and TMPDIR, removed afterwards;
- stdin from /dev/null and a scrubbed environment (no inherited variables, hence no secrets);
- limits: wall-clock timeout, CPU seconds, address space, file size (which also caps its output:
  stdout and stderr go to files, and writing past the limit fails with "File too large"), open files;
- its own session and process group (start_new_session), killed as a whole at the end (os.killpg).
A program passes only if it exits with status 0 *and* printed a secret nonce that the child prints
after the program ran to completion, so sys.exit(0), os._exit(0) or a killed parent cannot fake a pass.

The limits are set in the child, not in a `preexec_fn`: the subprocess docs warn that preexec_fn
is not safe in the presence of threads, and run_many launches processes from a thread pool.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 15.0     # wall clock (the slowest canonical MBPP solution, 123, needs 5 s)
    cpu_s: int = 15             # CPU seconds (SIGXCPU)
    memory_mb: int = 1024       # address space (MemoryError)
    output_kb: int = 1024       # size of any file written, stdout and stderr included (EFBIG)
    open_files: int = 64
    processes: int = 1          # RLIMIT_NPROC; only binds non-root users (the child also forbids fork)


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str                 # "passed", "failed" (raised / exited early), "timeout", "killed" (a signal)
    returncode: int
    stdout: str                 # the first `keep` characters, nonce removed
    stderr: str
    seconds: float


def scrubbed_env(work_dir):
    """A minimal environment: nothing is inherited from ours."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work_dir, "TMPDIR": work_dir,
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)      # the child's session: it and anything it spawned
    except (ProcessLookupError, PermissionError):
        pass                                     # the group is already gone


def _read(path):
    # at most limits.output_kb: a larger write was refused by RLIMIT_FSIZE
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def run_program(source, limits=Limits(), keep=4000):
    """Runs `source` in a fresh sandboxed process; returns a RunResult."""
    job_dir = tempfile.mkdtemp(prefix="t2-sandbox-")
    try:
        work_dir = os.path.join(job_dir, "work")
        os.mkdir(work_dir)
        nonce = "T2-SANDBOX-PASSED-" + secrets.token_hex(16)
        with open(os.path.join(job_dir, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(job_dir, "nonce"), "w") as f:
            f.write(nonce)
        out_path, err_path = os.path.join(job_dir, "stdout"), os.path.join(job_dir, "stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", CHILD, job_dir, json.dumps(asdict(limits))],
                                    cwd=work_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=scrubbed_env(work_dir), start_new_session=True, close_fds=True)
            try:
                returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                returncode, timed_out = proc.wait(), True
            finally:
                _kill_group(proc)                # stray grandchildren, even after a normal exit
        seconds = time.perf_counter() - start
        stdout, stderr = _read(out_path), _read(err_path)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    passed = returncode == 0 and not timed_out and f"\n{nonce}\n" in stdout
    status = ("passed" if passed else "timeout" if timed_out else "killed" if returncode < 0 else "failed")
    stdout = stdout.replace(f"\n{nonce}\n", "")
    return RunResult(passed, status, returncode, stdout[:keep], stderr[-keep:], seconds)


def run_many(sources, limits=Limits(), workers=None):
    """Runs many programs, each in its own process, `workers` at a time (default: one per CPU)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
