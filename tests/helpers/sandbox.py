"""A child-process sandbox that copies two settings of appliance.service for tests.

`MDWE_FILTER` is Python source installing the seccomp filter systemd uses for
MemoryDenyWriteExecute=yes (seccomp-util.c: EPERM for mmap with PROT_WRITE|PROT_EXEC,
mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC), after NoNewPrivileges.
`sandboxed(argv)` runs a program under it with the unit's UMask=0077 (and User=, when
root). Linux x86-64 only.
"""

from __future__ import annotations

import sys
import textwrap

MDWE_FILTER = textwrap.dedent(
    """
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    AUDIT_ARCH_X86_64 = 0xC000003E
    NR_MMAP, NR_MPROTECT, NR_SHMAT, NR_PKEY_MPROTECT = 9, 10, 30, 329
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    ALLOW, DENY_EPERM = 0x7FFF0000, 0x00050000 | 1
    LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
    ARG2_LOW = 16 + 2 * 8   # seccomp_data.args[2], low 32 bits (little endian)

    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)

    prog = [
        op(LD_W_ABS, 4), op(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), op(RET_K, ALLOW),
        op(LD_W_ABS, 0),
        # jump offsets count the instructions skipped: 4 -> index 9, 6/5 -> 12, 7 -> 15
        op(JEQ_K, NR_MMAP, 4, 0), op(JEQ_K, NR_MPROTECT, 6, 0),
        op(JEQ_K, NR_PKEY_MPROTECT, 5, 0), op(JEQ_K, NR_SHMAT, 7, 0),
        op(RET_K, ALLOW),
        # mmap: refuse when both PROT_WRITE and PROT_EXEC are asked
        op(LD_W_ABS, ARG2_LOW), op(AND_K, PROT_WRITE | PROT_EXEC),
        op(JEQ_K, PROT_WRITE | PROT_EXEC, 8, 7),
        # mprotect / pkey_mprotect: refuse any PROT_EXEC
        op(LD_W_ABS, ARG2_LOW), op(AND_K, PROT_EXEC), op(JEQ_K, PROT_EXEC, 5, 4),
        # shmat: refuse SHM_EXEC
        op(LD_W_ABS, ARG2_LOW), op(AND_K, SHM_EXEC), op(JEQ_K, SHM_EXEC, 2, 1),
        op(RET_K, ALLOW),
        op(RET_K, ALLOW),
        op(RET_K, DENY_EPERM),
    ]
    code = b"".join(prog)
    buf = ctypes.create_string_buffer(code)
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, ctypes.get_errno()
    assert libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()
    """
)


def sandboxed(argv: list[str], user: str | None = None) -> list[str]:
    """`argv` run under the MemoryDenyWriteExecute filter and umask 0077, via execv.

    With `user` (the caller must be root), the program runs as that user and its primary
    group, the way `User=`/`Group=` start the service.
    """
    switch = ""
    if user is not None:
        switch = (
            "import pwd\n"
            f"entry = pwd.getpwnam({user!r})\n"
            "os.setgroups([])\nos.setgid(entry.pw_gid)\nos.setuid(entry.pw_uid)\n"
        )
    launcher = MDWE_FILTER + "\nimport os, sys\nos.umask(0o077)\n" + switch + "os.execv(sys.argv[1], sys.argv[1:])\n"
    return [sys.executable, "-c", launcher, *argv]
