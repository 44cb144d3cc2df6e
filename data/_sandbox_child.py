"""The child side of the sandbox (see sandbox.py): runs ONE untrusted program, then signals that it
returned.

Started by sandbox.run_program as `python -I -B _sandbox_child.py LIMITS_JSON guard|unguarded` in
the program's working directory `work/` (in namespace mode, a tmpfs mounted there just before). The
job directory above it holds `program.py` (the untrusted code) and `done`, a FIFO (named pipe) whose
reading end the harness holds. In order, before any untrusted code runs, the child:

1. reads the program;
2. sets resource limits (address space, CPU seconds, file size, open files, processes, no core);
3. installs an audit hook (PEP 578) that refuses process creation, signals, sockets, ctypes, a
   second interpreter, trace functions, /proc, opening directories, any write, delete, rename or
   chmod outside `work/`, more than `files` new files, and any opening of `../done` but one;
4. disables functions the hook cannot see (os.mkfifo, os.mknod, os.setsid, ...) in `os` and `posix`,
   as human-eval's `reliability_guard` does.
(`unguarded` skips 3 and 4: only the tests use it, to show what the operating system holds alone.)

Then it executes the program in a fresh module named `__solution__` (not `__main__`, so that
`if __name__ == "__main__":` demo blocks of generated code do not run, as in human-eval).

The completion signal. The harness counts a pass only if the child exits with status 0 *and*
something was written to `../done`. The last line of main() writes it, and only a program that
returned gets there: one that raises, calls sys.exit or os._exit, or is killed never does. There is
no secret anywhere in this process: nothing to find in frames, gc.get_objects(), sys.argv, the
environment or /proc/self/mem. What a program would have to do is open `../done` itself, and the
audit hook refuses that unless the frame asking is the frame of this process's main() and that
frame is on its last line. So that a Python program cannot meet that condition:
- Python code cannot move another frame's instruction pointer, except a trace function setting
  `frame.f_lineno`; sys.settrace and sys.setprofile are refused (a trace function could also jump
  over the program's own tests);
- the hook's decisions use only functions and values bound when it was made, so replacing
  os.lstat, os.path.realpath or builtins does not change them; the hook itself is referenced from
  nowhere but the interpreter, and the tools that find unreferenced objects (gc.get_objects,
  gc.get_referrers, gc.get_referents) are refused, so its closure cannot be changed;
- a second interpreter (which would not have the hook), ctypes, /proc/self/mem, directory file
  descriptors (a dir_fd the hook cannot see), hard links and symbolic links to `../done` are refused.

What a program written to deceive the harness can still do:
- run native code in this process, and then open `../done` itself: through a memory-safety bug of
  CPython or of an extension module, or through crafted bytecode (types.CodeType, or marshal.loads,
  which the import system needs and so cannot be refused). It takes deliberate exploitation, in
  both modes: the namespaces confine such a program (no network, no other processes, a small
  tmpfs), but they cannot tell its signal from ours, because they are the same process.
- pass tests without being right: return an object whose __eq__ is always True, or replace what the
  tests call (math.isclose, builtins). The signal says that the tests ran to the end, not that they
  are good tests. The RL reward is only as trustworthy as both.
"""

import itertools
import json
import os
import resource
import stat
import sys
import types

PROGRAM, DONE = "../program.py", "../done"   # relative to the working directory: see the docstring


def set_limits(limits):
    mb = 2**20
    for name, value in [("RLIMIT_AS", limits["memory_mb"] * mb), ("RLIMIT_CPU", limits["cpu_s"]),
                        ("RLIMIT_FSIZE", limits["output_kb"] * 1024), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_NPROC", limits["processes"]), ("RLIMIT_CORE", 0)]:
        # RLIMIT_NPROC counts all processes of the user and does not bind root at all, hence the
        # audit hook and the guard below also forbid creating processes.
        # The CPU limit's hard value is one second above the soft one: at the soft limit the kernel
        # sends SIGXCPU (which run_program reports as a timeout); SIGKILL only if that is caught.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))


# Refused outright. Processes, signals and sockets as before; then what would let a program reach
# around the hook: a trace function (moves instruction pointers), the gc's object lists (reach the
# hook's closure), a second interpreter (has no hook), raising its own resource limits (root may).
FORBIDDEN = frozenset([
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect", "socket.bind",
    "socket.sendto", "socket.sendmsg", "os.chdir", "sys.settrace", "sys.setprofile",
    "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "cpython.PyInterpreterState_New", "resource.setrlimit", "resource.prlimit",
    # a second hook, or another thread's frames, would run or look at code while this hook runs
    "sys.addaudithook", "sys._current_frames"])
# Events that change the paths in their first N arguments: these must lie inside the working directory.
PATH_ARGS = {"os.remove": 1, "os.rmdir": 1, "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1,
             "os.setxattr": 1, "os.removexattr": 1, "os.mkdir": 1, "shutil.rmtree": 1,
             "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.move": 2}
CREATES = ("os.mkdir", "os.link", "os.symlink")                  # each counts as a new file
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_audit_hook(work_dir, max_files, main_frame, done_line):
    """Installs the audit hook. Everything it uses is bound here, as local names of this call, and
    the tables are copied: the program may replace module attributes and builtins (os.lstat, type,
    PermissionError...) and change this module's tables, which changes nothing here. `main_frame`
    and `done_line` say where `../done` may be opened."""
    getcwd, lstat, stat_, readlink, getframe = os.getcwd, os.lstat, os.stat, os.readlink, sys._getframe
    is_link, is_dir, str_, bytes_, int_, type_, next_, oserror, denied = (
        stat.S_ISLNK, stat.S_ISDIR, str, bytes, int, type, next, OSError, PermissionError)
    forbidden, path_args, creates = frozenset(FORBIDDEN), dict(PATH_ARGS), tuple(CREATES)
    write_flags, o_creat = WRITE_FLAGS, os.O_CREAT
    new_files = itertools.count(1)                               # can be advanced, never reset

    def realpath(path):
        """os.path.realpath of a str, with the functions bound above (the real one looks its helpers
        up at each call, and the program could replace them)."""
        todo = (path if path.startswith("/") else getcwd() + "/" + path).split("/")[::-1]
        parts, links = [], 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                parts = parts[:-1]
                continue
            where = "/" + "/".join(parts + [name])
            try:
                link = is_link(lstat(where).st_mode)
            except oserror:
                link = False                                     # missing: taken as written
            if not link:
                parts = parts + [name]
                continue
            links += 1
            if links > 40:
                raise denied("sandbox: too many levels of symbolic links")
            target = readlink(where)
            parts = [] if target.startswith("/") else parts
            todo += target.split("/")[::-1]
        return "/" + "/".join(parts)

    def resolve(path):
        kind = type_(path)
        if kind is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not str_:
            # os and io pass the path already converted; a path object here (shutil's events) is
            # refused rather than converted again: its __fspath__ is the program's code.
            raise denied("sandbox: paths must be str or bytes here")
        return realpath(path)

    def exists(where):
        try:
            lstat(where)
            return True
        except oserror:
            return False

    def new_file():
        if next_(new_files) > max_files:
            raise denied(f"sandbox: a program may create at most {max_files} files")

    work = realpath(work_dir) + "/"
    done = realpath(DONE)

    def hook(event, args):
        if event in forbidden or event.startswith("ctypes."):
            raise denied(f"sandbox: {event} is not allowed")
        if event == "open":
            path, _, flags = args                                # flags say what the mode means
            if type_(path) is int_:
                return                                           # an open descriptor (never a directory's)
            where = resolve(path)
            if where == done:
                if getframe(1) is not main_frame or main_frame.f_lineno != done_line:
                    raise denied("sandbox: ../done is the sandbox's completion signal")
                return
            if where == "/proc" or where.startswith("/proc/"):
                raise denied("sandbox: /proc is not readable (the harness's environment and memory)")
            try:
                directory = is_dir(stat_(where).st_mode)
            except oserror:
                directory = False
            if directory:
                # its descriptor could serve as dir_fd, and the paths relative to it are not in the event
                raise denied(f"sandbox: opening a directory ({where}) is not allowed")
            flags = flags if type_(flags) is int_ else 0
            if flags & write_flags:
                if not where.startswith(work):
                    raise denied(f"sandbox: writing {where} outside the working directory")
                if flags & o_creat and not exists(where):
                    new_file()
        elif event in path_args:
            for path in args[:path_args[event]]:
                if type_(path) is int_:
                    raise denied(f"sandbox: {event} on a file descriptor is not allowed")
                if not resolve(path).startswith(work):
                    raise denied(f"sandbox: {event} outside the working directory")
            if event in creates:
                new_file()
        elif event in ("os.listdir", "os.scandir") and args[0] is not None and type_(args[0]) is not int_:
            where = resolve(args[0])
            if where == "/proc" or where.startswith("/proc/"):
                raise denied("sandbox: /proc is not readable")
    sys.addaudithook(hook)


def reliability_guard():
    """Disables functions (after openai/human-eval execution.py reliability_guard), in `os` and in
    `posix` (which `os` copies them from: disabling only os.fork leaves posix.fork). Most are also
    refused by the audit hook; mkfifo, mknod, setsid and setpgid raise no audit event at all.
    os._exit stays: a program that calls it still fails, because it never writes ../done."""
    import builtins
    import posix
    import shutil
    builtins.exit = builtins.quit = builtins.help = None
    for name in ["kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "fchdir",
                 "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
                 "fchown", "chmod", "chown", "chroot", "lchown", "lchmod", "lchflags", "chdir", "setsid",
                 "setpgid", "setpgrp", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn",
                 "posix_spawnp", "popen", "mkfifo", "mknod"]:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    import _posixsubprocess                       # what subprocess forks with (its Popen is refused by the hook)
    _posixsubprocess.fork_exec = None
    for name in ["ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing",
                 "_xxsubinterpreters", "_xxinterpchannels", "_interpreters"]:
        sys.modules[name] = None                 # `import ctypes` now raises ImportError


def last_line(code):
    return max(line for _, _, line in code.co_lines() if line is not None)


def main():
    limits, guarded = json.loads(sys.argv[1]), sys.argv[2] == "guard"
    with open(PROGRAM, encoding="utf-8") as f:
        source = f.read()
    set_limits(limits)
    if guarded:
        install_audit_hook(os.getcwd(), limits["files"], sys._getframe(), last_line(main.__code__))
        reliability_guard()

    module = types.ModuleType("__solution__")
    sys.modules["__solution__"] = module
    try:
        exec(compile(source, "program.py", "exec"), module.__dict__)
    except BaseException as e:                   # SystemExit included: exiting early is a failure
        report(e)
        return 1
    flush()
    os.write(os.open(DONE, os.O_WRONLY | os.O_NONBLOCK), b"done")  # the last line: the completion signal


def report(e):
    """Prints the program's exception from its own frame on. traceback is imported only now: it
    costs about 12 ms, and most programs that pass never need it."""
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    flush()


def flush():
    for stream in (sys.stdout, sys.stderr):     # the program may have replaced or closed them
        try:
            stream.flush()
        except Exception:
            pass


if __name__ == "__main__":
    os._exit(main() or 0)
