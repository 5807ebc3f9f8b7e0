"""A probe an agent's sandbox runs to prove its seccomp filter holds through every syscall entry
point: the compat ABIs (i386 `int 0x80`, with the socketcall and ipc multiplexers; x32) and the
address families no agent needs (vsock, which reaches the host; packet; AF_ALG; netlink other
than rtnetlink), including a family passed with high bits set, which the kernel truncates to
an int. `PROBE` is Python source for `python3 -c` inside the sandbox (only the interpreter and
ctypes); the startup self-test and the privileged tests run it. No privilege, no I/O here."""

from __future__ import annotations

# Each check prints `PASS name detail` or `FAIL name detail`. A compat call passes when it
# cannot complete (the kernel kills the thread with SIGSYS, or it fails) and fails when it
# returns a descriptor or success; a refused family passes only on EPERM (the filter's answer,
# counted by the daemon's listener), never on EAFNOSUPPORT or the like, which would mean the
# kernel was asked. Compat calls run in a forked child, so the kill ends only that child.
PROBE = r"""
import ctypes, json, mmap, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
MAP_32BIT = 0x40
EPERM = 1
# long call(nr, a, b, c): int 0x80 with eax=nr, ebx=a, ecx=b, edx=c (rdi, rsi, rdx, rcx).
INT80 = bytes.fromhex("53" "4889f8" "4889f3" "4989c8" "4889d1" "4c89c2" "cd80" "5b" "c3")
page = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT, -1, 0)
ctypes.memmove(page, INT80, len(INT80))
int80 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                         ctypes.c_long)(page)
args32 = page + 2048  # socketcall's argument block: 32-bit words below 4 GiB

def say(verdict, name, detail):
    print(("PASS " if verdict else "FAIL ") + name + " " + json.dumps(detail), flush=True)

def in_child(name, call):
    # The kernel kills a thread that enters through an ABI the filter does not admit.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, str(call()).encode())
        os._exit(0)
    os.close(write)
    result = os.read(read, 64).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        say(True, name, {"signal": os.WTERMSIG(status)})
    else:
        value = int(result)
        say(value < 0, name, {"result": value})

def words(*values):
    ctypes.memmove(args32, b"".join(v.to_bytes(4, "little") for v in values), 4 * len(values))
    return args32

def x32(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(0x40000000 | nr), *(ctypes.c_long(a) for a in args))
    return result if result >= 0 else -ctypes.get_errno()

def refused(name, nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    error = ctypes.get_errno() if result < 0 else 0
    if result >= 0:
        os.close(result)
    say(result < 0 and error == EPERM, name, {"result": result, "errno": error})

AF_VSOCK, SOCK_STREAM, SOCK_DGRAM = 40, 1, 2
checks = sys.argv[1:] or ["compat", "families"]
if "compat" in checks:
    in_child("i386-socketcall-vsock", lambda: int80(102, 1, words(AF_VSOCK, SOCK_STREAM, 0), 0))
    in_child("i386-socket-vsock", lambda: int80(359, AF_VSOCK, SOCK_STREAM, 0))
    in_child("i386-ipc-shmget", lambda: int80(117, 23, 0, 4096))
    in_child("i386-unshare", lambda: int80(310, 0x10000000, 0, 0))
    in_child("x32-socket-vsock", lambda: x32(41, AF_VSOCK, SOCK_STREAM, 0))
    in_child("x32-unshare", lambda: x32(272, 0x10000000))
if "families" in checks:
    refused("socket-vsock", 41, AF_VSOCK, SOCK_STREAM, 0)
    refused("socket-vsock-high-bits", 41, (1 << 32) | AF_VSOCK, SOCK_STREAM, 0)
    refused("socket-packet", 41, 17, SOCK_DGRAM, 0)
    refused("socket-alg", 41, 38, 5, 0)
    refused("socket-netlink-diag", 41, 16, SOCK_DGRAM, 4)
    refused("socketpair-vsock", 53, AF_VSOCK, SOCK_STREAM, 0, words(0, 0))
print("probe-done", flush=True)
"""

# The family checks the filter refuses through the daemon's listener: each is one attempt.
NOTIFIED_CHECKS = ("socket-vsock", "socket-vsock-high-bits", "socket-packet", "socket-alg",
                   "socket-netlink-diag", "socketpair-vsock")
COMPAT_CHECKS = ("i386-socketcall-vsock", "i386-socket-vsock", "i386-ipc-shmget",
                 "i386-unshare", "x32-socket-vsock", "x32-unshare")
DONE = "probe-done"
