"""A seccomp filter for bwrap mode (`bwrap --seccomp FD`): the program may not trace or read another
process, whatever native code it runs.

Why: in bwrap mode the namespace's first process is bwrap's own, run as the same user as the program
and dumpable, so a program with native code (ctypes, unguarded) could PTRACE_SEIZE it and read or write
its memory with process_vm_readv/process_vm_writev, or take its descriptors with pidfd_getfd. (In
"namespaces" mode the first process is a shell that kept its capabilities in the namespace: the kernel
already refuses a process without them.) The kernel's seccomp filters are classic BPF programs over
struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}; this one is eight-byte instructions
packed by hand, so no libseccomp is needed:

    load arch; not this machine's ABI (e.g. i386 calls from an x86-64 process) -> EPERM
    load nr;   x32 calls (nr >= 2**30 on x86-64) -> EPERM
    nr is ptrace, process_vm_readv, process_vm_writev or pidfd_getfd -> EPERM
    anything else -> allowed

filter_program() is None on an architecture not listed in SYSCALLS: there the filter is left out.
"""

import errno
import platform
import struct

# From linux/audit.h (AUDIT_ARCH_*) and each architecture's unistd.h.
SYSCALLS = {
    "x86_64": (0xC000003E, {"ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438}),
    "aarch64": (0xC00000B7, {"ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438}),
}
X32_BIT = 0x40000000                            # x86-64's x32 ABI: the same calls under other numbers

# linux/bpf_common.h and linux/seccomp.h
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
NR, ARCH = 0, 4                                 # offsets in struct seccomp_data


def _op(code, k, jt=0, jf=0):
    return struct.pack("=HBBI", code, jt, jf, k)     # struct sock_filter, in the machine's byte order


def filter_program(machine=None):
    """The filter as bytes (what bwrap reads from --seccomp's descriptor), or None where unknown."""
    machine = machine or platform.machine()
    if machine not in SYSCALLS:
        return None
    arch, numbers = SYSCALLS[machine]
    denied = sorted(numbers.values())
    # Jumps count instructions forward from the next one; `deny` is the last instruction.
    body = [_op(LD_W_ABS, NR)]
    if machine == "x86_64":
        body.append(_op(JGE_K, X32_BIT, jt=len(denied) + 1))
    body += [_op(JEQ_K, nr, jt=len(denied) - i) for i, nr in enumerate(denied)]
    body.append(_op(RET_K, RET_ALLOW))
    head = [_op(LD_W_ABS, ARCH), _op(JEQ_K, arch, jt=0, jf=len(body))]
    return b"".join(head + body + [_op(RET_K, RET_ERRNO | errno.EPERM)])
