"""The child side of the sandbox (see sandbox.py): runs ONE untrusted program, then signals that it
returned.

Started by sandbox.run_program as `python -I -B _sandbox_child.py MODE guard|unguarded FD memory_mb=1024 ...`
(the limits, as key=value) in the program's working directory, with the program as stdin and FD the
writing end of a pipe whose reading end only the harness holds. Before any untrusted code runs, it:

1. reads the program from stdin (which stays at its end: a program's input() sees end of file);
2. in "namespaces" mode, confine(): what bwrap's command line does in "bwrap" mode (sandbox.py);
3. sets resource limits (address space, CPU seconds, file size, open files, processes, no core) and
   lets SIGINT kill it outright (no Python code runs on a signal);
4. installs the audit hook (PEP 578), which writes a fresh random token to FD once, now, and keeps
   it; with `guard` (`unguarded` is for the tests that show what the kernel holds alone) the hook
   also stops the program at the first action it refuses: creating processes or threads, signals,
   sockets, ctypes, a second interpreter, trace functions, the gc's object lists, /proc, opening
   directories, links, any write, delete, rename or chmod outside the working directory, more than
   `files` new files, and loading a second copy of an extension module, one from outside Python's
   own directories, or one of the unsafe ones (_ctypes, _test*, _xx*); in "guard" mode, where no
   kernel isolation backs it, also what GUARD_MODE_MODULES' comment lists (native code but the
   standard library's and numpy's, sqlite3, shared memory, ioctl, signals through descriptors, sockets
   but socketpair's);
5. with `guard`, disables what raises no audit event (os.mkfifo, os.mknod, os.setsid, os.pidfd_open,
   signal.signal, ...) in every module that holds it, as human-eval's `reliability_guard` does, after
   loading every built-in module and then removing the means to make another copy of one.

Then it executes the program in a fresh module named `__solution__` (not `__main__`, so that
`if __name__ == "__main__":` demo blocks of generated code do not run, as in human-eval).

The completion signal. The harness counts a pass only if the child exits with status 0 and the token
arrived on FD twice: the second time from the hook, on the audit event that the last line of main()
raises, and only if the frame raising it is that of main() and on that line. A program that raises,
exits early, is stopped or killed never gets there; what it may write to FD itself is worthless
without the token. Why a program cannot get the token from Python:
- only the hook's closure holds it; the hook is referenced by the interpreter alone, and the gc's
  object lists (gc.get_objects, get_referrers, get_referents) are refused; nothing else in the
  process (frames, modules, sys.argv, the environment) ever held it;
- the hook's frame, whose locals would show it, never reaches the program: the hook refuses by
  stopping the process, not by raising, so no traceback passes through it; and no program code runs
  while it runs (no threads, no Python signal handlers, the collector paused in it), so no code can
  look at it, or change a file between its check and the action it checks (a race);
- the process's memory is out of reach: no /proc (empty in the namespace modes; refused in guard mode),
  no ctypes, no second copy of a module whose functions were disabled;
- no other process exists (kernel: RLIMIT_NPROC) to read it or to write the signal.
Python code cannot move the instruction pointer of main() to its last line either: trace functions
(sys.settrace, sys.setprofile, sys.monitoring) are refused, and code objects cannot be changed.

What a program written to deceive the harness can still do:
- run native code in this process, and then read the token from memory: through a memory-safety
  bug of CPython or of an extension module (numpy's as_strided reaches any address), or crafted
  bytecode (types.CodeType, marshal.loads, which the import system needs). It takes deliberate
  exploitation; the kernel's limits in the namespace modes hold even then, the guard's do not.
- pass tests without being right: return an object whose __eq__ is always True, or replace what the
  tests call (math.isclose, builtins). The signal says that the tests ran to the end, not that they
  are good tests. The RL reward is only as trustworthy as both.
"""

import fcntl
import itertools
import os
import resource
import stat
import sys
import types

DONE = "t2.sandbox.done"        # the audit event of main()'s last line: the completion signal


def confine(disk_mb, files):
    """"namespaces" mode: the child starts as root of its new namespaces (unshare --map-root-user, which
    maps it to the harness's user or SANDBOX_UID), with every capability there. It takes what the
    program must not have, then gives up the capabilities for good. ctypes is trusted here, and gone
    from sys.modules before the program runs (reliability_guard)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def call(result, what):
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"sandbox confine: {what}: {os.strerror(errno)}")

    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    with open("/proc/sys/user/max_user_namespaces", "w") as f:   # this namespace's: none inside it
        f.write("0")
    # mount_setattr(2) (Linux 5.12; 442 on every architecture): the whole tree read-only, no setuid
    attr = (ctypes.c_uint64 * 4)(0x1 | 0x2, 0, 0, 0)             # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    call(libc.syscall(442, -100, b"/", 0x8000, attr, ctypes.sizeof(attr)), "mount_setattr / read-only")
    nosuid, nodev, noexec = 2, 4, 8
    call(libc.mount(b"t2-proc", b"/proc", b"tmpfs", 1 | nosuid | nodev | noexec, b"size=4k,mode=555"), "an empty /proc")
    # A /tmp of its own (no other job's files, as bwrap's), read-only but for the working directory
    # in it: a tmpfs of at most disk_mb MB and `files` files and directories (the kernel counts them).
    call(libc.mount(b"t2-tmp", b"/tmp", b"tmpfs", nosuid | nodev | noexec, b"size=4k,nr_inodes=2,mode=755"), "/tmp")
    os.mkdir("/tmp/work")
    call(libc.mount(b"t2-sandbox", b"/tmp/work", b"tmpfs", nosuid | nodev | noexec,
                    f"size={disk_mb}m,nr_inodes={files + 1},mode=700".encode()), "the working directory")
    call(libc.syscall(442, -100, b"/tmp", 0, attr, ctypes.sizeof(attr)), "mount_setattr /tmp read-only")
    os.chdir("/tmp/work")
    # No capability kept, none gained by exec as root (SECBIT_NOROOT and the others, locked), none left.
    call(libc.prctl(28, 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80, 0, 0, 0), "PR_SET_SECUREBITS")
    for cap in range(last_cap + 1):
        call(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # _LINUX_CAPABILITY_VERSION_3
    call(libc.capset(header, data), "capset")
    call(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def set_limits(limits):
    mb = 2**20
    for name, value in [("RLIMIT_AS", limits["memory_mb"] * mb), ("RLIMIT_CPU", limits["cpu_s"]),
                        ("RLIMIT_FSIZE", limits["output_kb"] * 1024), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_NPROC", limits["processes"]), ("RLIMIT_CORE", 0)]:
        # RLIMIT_NPROC counts the processes and threads of the user (in its user namespace, in the
        # namespace modes) and binds every user but root, hence sandbox.py's SANDBOX_UID.
        # The CPU limit's hard value is one second above the soft one: at the soft limit the kernel
        # sends SIGXCPU (which run_program reports as a timeout); SIGKILL only if that is caught.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))
    import _signal
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)              # no KeyboardInterrupt: no Python code on a signal


# Refused outright: processes, threads, signals and sockets; then what would let a program reach
# around the hook: a trace function (moves instruction pointers), the gc's object lists (reach the
# hook's closure), a second interpreter (has no hook), raising its own resource limits (root may),
# another hook, links (a link's target is read where it is used, not where it is made).
FORBIDDEN = frozenset([
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "pty.spawn", "_thread.start_new_thread", "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect",
    "socket.bind", "socket.sendto", "socket.sendmsg", "os.chdir", "sys.settrace", "sys.setprofile",
    "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "cpython.PyInterpreterState_New", "resource.setrlimit", "resource.prlimit", "sys.addaudithook",
    "sys._current_frames", "os.link", "os.symlink"])
# Events that change the paths in their first N arguments: these must lie inside the working directory.
PATH_ARGS = {"os.remove": 1, "os.rmdir": 1, "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1,
             "os.setxattr": 1, "os.removexattr": 1, "os.mkdir": 1, "shutil.rmtree": 1, "os.rename": 2,
             "shutil.move": 2}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
UNSAFE_MODULES = ("_ctypes", "_test", "_xx", "_interp", "_lsprof")   # native access, other interpreters, profiling
# Guard mode only (the kernel modes' read-only root, tmpfs and namespaces hold these): native code from
# outside the standard library but numpy's (any may write files without an event: safetensors, tokenizers);
# standard modules that make files, shared memory or semaphores, or write the host's log, without any
# `open` event to check or count;
# ioctl (FIOASYNC, TIOCSTI...); signals sent through a descriptor (fcntl's F_SETOWN, F_SETOWN_EX,
# F_SETSIG, O_ASYNC), which never call kill(); and sockets but a local pair's (AF_UNIX): listen() binds
# an unbound socket itself, and a netlink socket needs no connect or bind to read the host's network.
GUARD_MODE_MODULES = ("_sqlite3", "_dbm", "_gdbm", "_posixshmem", "_multiprocessing", "readline", "syslog")
# F_SETOWN, F_SETSIG and Linux's F_SETOWN_EX (15; not in the fcntl module), by this platform's numbers
SIGNALING_FCNTL = frozenset({fcntl.F_SETOWN, getattr(fcntl, "F_SETSIG", fcntl.F_SETOWN),
                             15 if sys.platform.startswith("linux") else fcntl.F_SETOWN})
O_ASYNC, F_SETFL, AF_UNIX = os.O_ASYNC, fcntl.F_SETFL, 1


def install_audit_hook(work_dir, max_files, main_frame, done_line, signal_fd, guard=True, guard_mode=False):
    """Installs the audit hook and writes the token's first copy to signal_fd. guard_mode: the guard
    alone (no kernel isolation) also refuses what GUARD_MODE_MODULES' comment lists. Everything the hook
    uses is bound here, as local names of this call, and the tables are copied: the program may replace
    module attributes and builtins (os.lstat, type, PermissionError...) and change this module's
    tables, which changes nothing here. `main_frame` and `done_line` say where DONE may be raised."""
    import gc
    getcwd, lstat, stat_, readlink, write, exit_ = os.getcwd, os.lstat, os.stat, os.readlink, os.write, os._exit
    getframe, gc_disable, gc_enable, gc_isenabled = sys._getframe, gc.disable, gc.enable, gc.isenabled
    is_link, is_dir, str_, bytes_, int_, type_, next_, oserror = (
        stat.S_ISLNK, stat.S_ISDIR, str, bytes, int, type, next, OSError)
    forbidden, path_args, write_flags, o_creat = frozenset(FORBIDDEN), dict(PATH_ARGS), WRITE_FLAGS, os.O_CREAT
    done = DONE
    new_files = itertools.count(1)                               # can be advanced, never reset
    loaded = set(sys.modules)                                    # a second copy of these is refused
    unsafe, guard_only = tuple(UNSAFE_MODULES), tuple(GUARD_MODE_MODULES)
    signaling, o_async, f_setfl, af_unix = SIGNALING_FCNTL, O_ASYNC, F_SETFL, AF_UNIX
    token = os.urandom(16).hex().encode()                        # TOKEN_BYTES hex digits
    write(signal_fd, token)

    def realpath(path, follow=True):
        """os.path.realpath of a str, with the functions bound above (the real one looks its helpers
        up at each call, and the program could replace them); follow=False: os.path.abspath's."""
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
                link = follow and is_link(lstat(where).st_mode)
            except oserror:
                link = False                                     # missing: taken as written
            if not link:
                parts = parts + [name]
                continue
            links += 1
            if links > 40:
                return None                                      # too many levels of symbolic links
            target = readlink(where)
            parts = [] if target.startswith("/") else parts
            todo += target.split("/")[::-1]
        return "/" + "/".join(parts)

    def resolve(path, follow=True):
        """The real path of a str or bytes path; None for anything else: a path object here (shutil's
        events, sys.audit) is refused rather than converted again, as its methods are the program's."""
        kind = type_(path)
        if kind is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not str_:
            return None
        return realpath(path, follow)

    def in_proc(path):
        """Whether `path` leads into /proc, or is written as a path in it: /proc/self/root/<path>
        leads to /<path>, but through /proc (and its magic links need not lead where they read)."""
        return any(where is None or where == "/proc" or where.startswith("/proc/")
                   for where in (resolve(path), resolve(path, False)))

    work = realpath(work_dir) + "/"
    python = tuple(realpath(p) + "/" for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                               *[p for p in sys.path if os.path.isdir(p)]} if p)
    # guard mode: the standard library's extension modules (lib-dynload, beside os.py) and numpy's
    native = (realpath(os.path.dirname(os.__file__)) + "/lib-dynload/", *(p + "numpy/" for p in python))
    def inside(path):
        where = resolve(path)
        return where is not None and where.startswith(work)

    def verdict(event, args):
        """Why the program must stop, or None: the guard's decision on one event."""
        if event in forbidden or event.startswith("ctypes."):
            return f"{event} is not allowed"
        if event == "open":
            path, _, flags = args                                # flags say what the mode means
            if type_(path) is int_:
                return None                                      # an open descriptor (never a directory's)
            where = resolve(path)
            if where is None:
                return "paths must be str or bytes"
            if in_proc(path):
                return "/proc is not readable (the harness's environment and memory)"
            try:
                if is_dir(stat_(where).st_mode):                 # its descriptor could serve as dir_fd
                    return f"opening a directory ({where}) is not allowed"
                existed = True
            except oserror:
                existed = False
            flags = flags if type_(flags) is int_ else 0
            if flags & write_flags and not where.startswith(work):
                return f"writing {where} outside the working directory"
            if flags & o_creat and not existed and next_(new_files) > max_files:
                return f"a program may create at most {max_files} files"
        elif event in path_args:
            for path in args[:path_args[event]]:
                if not inside(path):
                    return f"{event} outside the working directory"
            if event == "os.mkdir" and next_(new_files) > max_files:
                return f"a program may create at most {max_files} files"
        elif event in ("os.listdir", "os.scandir") and args and args[0] is not None and type_(args[0]) is not int_:
            if in_proc(args[0]):
                return "/proc is not readable"
        elif event == "import" and len(args) > 1 and args[1] is not None:   # an extension module's file
            name, where = args[0], resolve(args[1])
            if type_(name) is not str_ or where is None:
                return "module names and files must be str"
            if name in loaded:
                return f"a second copy of module {name} (it would bring back what the guard disabled)"
            if guard_mode and (name.startswith(guard_only) or not where.startswith(native)):
                return f"module {name} is not allowed in guard mode (files or signals the guard cannot see): {where}"
            if name.startswith(unsafe) or not where.startswith(python) or where.startswith(work):
                return f"loading {where} as module {name}"
            loaded.add(name)
        elif not guard_mode:
            return None
        elif event == "fcntl.fcntl" and (args[1] in signaling or args[1] == f_setfl and type_(args[2]) is int_
                                         and args[2] & o_async):
            return "signals through a descriptor (F_SETOWN, F_SETSIG, O_ASYNC) are not allowed in guard mode"
        elif event == "fcntl.ioctl":
            return "ioctl is not allowed in guard mode"
        elif event == "socket.__new__" and args[1] != af_unix:
            return "sockets (but socket.socketpair's) are not allowed in guard mode"
        return None

    def hook(event, args):
        collecting = gc_isenabled()
        gc_disable()                             # no finalizer of the program runs while this decides
        try:
            if type_(event) is str_ and event == done:
                why = None if getframe(1) is main_frame and main_frame.f_lineno == done_line else \
                    f"{done} is the completion signal of the sandbox"
                if why is None:
                    write(signal_fd, token)
            else:
                why = verdict(event, args) if guard else None
        except BaseException:                    # a bug here, or no memory: stop rather than let it through
            why = f"the guard failed on {event!r}"
        if why is not None:
            # Stop, not raise: a traceback through this frame would show the program the token.
            try:
                write(2, f"sandbox: {why}; the program was stopped\n".encode("utf-8", "replace"))
            finally:
                exit_(1)
        if collecting:
            gc_enable()
    sys.addaudithook(hook)


# Disabled (set to None) wherever they are: they raise no audit event, or are refused by it already.
DISABLED = {
    "os": ["kill", "killpg", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot",
           "lchown", "lchmod", "lchflags", "chdir", "setsid", "setpgid", "setpgrp", "execv", "execve", "execvp",
           "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "popen", "mkfifo", "mknod", "pidfd_open",
           "link", "symlink"],
    "signal": ["signal", "pidfd_send_signal", "set_wakeup_fd"],
    "_thread": ["start_new_thread", "start_new", "start_joinable_thread"],     # no audit event before 3.13
    "threading": ["_start_new_thread", "_start_joinable_thread"],
    "_posixsubprocess": ["fork_exec"],
    "shutil": ["rmtree", "move", "chown"]}       # if loaded: once loaded later, they use the disabled os functions
HIDDEN = ["ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing",
          "_xxsubinterpreters", "_xxinterpchannels", "_interpreters"]


def reliability_guard():
    """Disables functions (after openai/human-eval execution.py reliability_guard), in the module
    named and in the one it copies them from (posix for os, _signal for signal), and makes sure no
    fresh copy of those can be made: every built-in module is loaded now, and then the function that
    makes built-in modules is removed (extension modules are the hook's: a second copy is refused).
    os._exit stays: a program that calls it still fails, as it never raises DONE."""
    import _imp
    import builtins
    for name in sys.builtin_module_names:
        __import__(name)
    import posix
    import _posixsubprocess
    import _signal
    import _thread
    builtins.exit = builtins.quit = builtins.help = None
    twins = {"os": posix, "signal": _signal}     # signal.py, if loaded later, copies _signal's (None)
    for module_name, names in DISABLED.items():
        for module in (sys.modules.get(module_name), twins.get(module_name)):
            for name in names:
                if module is not None and hasattr(module, name):
                    setattr(module, name, None)
    _imp.create_builtin = _imp.exec_builtin = None
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")] + HIDDEN:
        sys.modules[name] = None                 # `import ctypes` now raises ImportError


def last_line(code):
    return max(line for _, _, line in code.co_lines() if line is not None)


def main():
    mode, guarded, signal_fd = sys.argv[1], sys.argv[2] == "guard", int(sys.argv[3])
    limits = {key: int(value) for key, value in (arg.split("=") for arg in sys.argv[4:])}   # (json costs 7 ms)
    source = sys.stdin.buffer.read().decode("utf-8")
    os.environ.pop("PWD", None)                  # bwrap's: the environment is the harness's scrubbed_env()
    if mode == "namespaces":
        confine(limits["disk_mb"], limits["files"])
    set_limits(limits)
    sys.stdout.reconfigure(line_buffering=True)  # what was printed survives a stop
    install_audit_hook(os.getcwd(), limits["files"], sys._getframe(), last_line(main.__code__), signal_fd, guarded,
                       mode == "guard")
    if guarded:
        reliability_guard()

    module = types.ModuleType("__solution__")
    sys.modules["__solution__"] = module
    try:
        exec(compile(source, "program.py", "exec"), module.__dict__)
    except BaseException as e:                   # SystemExit included: exiting early is a failure
        report(e)
        return 1
    flush()
    sys.audit(DONE)                              # the last line: the completion signal (see the docstring)


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
