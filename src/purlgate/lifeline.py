"""Child processes that end when their parent does, however it ends (kill -9 included).

Linux's ``PR_SET_PDEATHSIG``: the kernel sends the child SIGKILL when the thread that
made it exits. ``serve`` makes its helpers from its event loop thread, which lives as
long as the process. Elsewhere (not Linux or glibc) this does nothing, and a child
ends when it reads EOF from its parent instead.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel kill this process when its parent ends. ``parent``: the pid it
    must have; if it has already gone (it died before this call), exit now."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux/glibc
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)
