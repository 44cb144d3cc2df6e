"""The first stage of the namespace modes (see sandbox.py): mounts made in a mount namespace of its own,
before the sandbox's namespaces, which neither the host nor another job ever sees.

- A root harness's interpreter may live where SANDBOX_UID cannot go (pyenv under /root): view()
  covers each such directory with a tmpfs that holds only the interpreter's directories.
- bwrap mode: bwrap's options cannot bound a tmpfs's number of files, so the first stage mounts the
  working directory's tmpfs (at most disk_mb MB and `files` files and directories: the kernel counts
  inodes however they are made, sqlite3's or native code's; noexec) on /tmp, and bwrap binds it on
  /tmp/work in its own empty /tmp. A harness that is not root makes that mount in a user namespace of
  its own (where it may: userns_mounts()).

The mounts are written as an fstab in the job's folder, and one `mount --all --fstab` makes them, in
order (a shell line per mount cost about 13 ms more a program).
"""

import functools
import os
import shlex
import shutil
import subprocess
import sys
import warnings

SANDBOX_UID = 65534             # "nobody": whom a root harness runs programs as, in the namespace modes
HERE = os.path.dirname(os.path.abspath(__file__))      # where the child (_sandbox_child.py) lives


def first_stage(limits, job_dir, root, staged):
    """The command line's first part: `unshare` into a mount namespace of its own (and a user namespace,
    where the harness is not root), whose shell makes the mounts and execs the rest; [] if there are
    none. `staged`: whether the working directory's tmpfs is made here (bwrap mode)."""
    mounts = view(job_dir) if root else []
    if staged:
        owner = f",uid={SANDBOX_UID},gid={SANDBOX_UID}" if root else ""
        mounts.append(("t2-sandbox", "/tmp", "tmpfs", f"size={limits.disk_mb}m,nr_inodes={limits.files + 1},"
                                                      f"mode=700,nosuid,nodev,noexec{owner}"))
    if not mounts:
        return []
    fstab = os.path.join(job_dir, "fstab")
    with open(fstab, "w", encoding="utf-8", opener=private) as f:
        f.write("".join(" ".join(map(_fstab_field, fields)) + " 0 0\n" for fields in mounts))
    return ["unshare", *([] if root else ["--user", "--map-root-user"]), "--mount", "--propagation", "private",
            "--", "/bin/sh", "-c", f'mount --all --fstab {shlex.quote(fstab)} && exec "$@"', "sh"]


def _fstab_field(text):
    return text.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def private(path, flags):
    return os.open(path, flags, 0o600)           # the job's files: the harness's user's alone


def located(args):
    """The tools by their full paths: the child's PATH (scrubbed_env) may not hold them."""
    return [(shutil.which(a) or a) if a in ("bwrap", "unshare", "setpriv") else a for a in args]


@functools.lru_cache(maxsize=None)
def userns_mounts():
    """Whether this harness, not root, may mount in a user namespace of its own, as bwrap mode's first
    stage does. Where it may not (Ubuntu 24.04's AppArmor lets bwrap make one, but not `unshare`),
    bwrap mounts the working directory itself, bounded in bytes only; this warns once, saying so."""
    try:
        probe = subprocess.run(located(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
                                        "--", "mount", "-t", "tmpfs", "t2-probe", "/tmp"]), capture_output=True,
                               text=True, timeout=30)
        problem = None if probe.returncode == 0 else \
            (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem is not None:
        warnings.warn(f"sandbox: this user may not mount in a user namespace of its own ({problem}): in bwrap "
                      f"mode the working directory is bounded in bytes, but only the guard counts its files",
                      RuntimeWarning, stacklevel=2)
    return problem is None


def searchable(path, uid=SANDBOX_UID, gid=SANDBOX_UID):
    """Whether `uid` (in group `gid` only) may enter the directory `path`, by its mode bits."""
    st = os.stat(path)
    return bool(st.st_mode & (0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001))


@functools.lru_cache(maxsize=None)
def hidden_paths():
    """{directory SANDBOX_UID cannot enter: [the interpreter's directories below it]}: what a root
    harness must show the sandbox's user, e.g. {"/root": ["/root/.pyenv/versions/3.11.7"]}."""
    needed = {os.path.realpath(p) for p in [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
                                            HERE, os.path.dirname(os.path.realpath(sys.executable)),
                                            *sys.path] if p and os.path.isdir(p)}
    hidden = {}
    for path in sorted(needed):
        parts = path.split("/")
        blocked = next((d for d in ("/".join(parts[:i]) for i in range(2, len(parts))) if not searchable(d)), None)
        if blocked is not None:                      # (a needed directory closed itself cannot be helped)
            hidden.setdefault(blocked, []).append(path)
    return {d: [p for p in ps if not any(p.startswith(q + "/") for q in ps)] for d, ps in hidden.items()}


def view(job_dir):
    """The mounts (fstab fields: what, where, type, options) that make hidden_paths() visible to
    SANDBOX_UID: each hidden directory covered with a tmpfs that holds only the interpreter's
    directories, bound read-only (each bound aside into job_dir first, then back; X-mount.mkdir
    makes the way)."""
    mounts, staged = [], 0
    for covered, paths in hidden_paths().items():
        aside = [f"{job_dir}/view{staged + i}" for i in range(len(paths))]
        mounts += [(path, there, "none", "bind,X-mount.mkdir") for path, there in zip(paths, aside)]
        mounts.append(("t2-view", covered, "tmpfs", "mode=755"))
        mounts += [(there, path, "none", "bind,ro,X-mount.mkdir") for path, there in zip(paths, aside)]
        staged += len(paths)
    return mounts
