"""Child processes that end with the process that started them.

``fleet demo`` and the tests start redis-servers, hubs and workers in sessions of their own, so that a terminal's
Ctrl-C reaches the parent alone and the parent stops them in order (workers drain, then hubs, then Redis). A parent
killed before its clean-up ran (SIGKILL, the OOM killer, a signal it does not handle) would then leave them all
running, holding their ports: the next ``make run`` found them and refused to start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ended_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when this process ends, or None where it cannot.

    SIGTERM, not SIGKILL: a worker drains and a hub closes its connections, as on any stop. Linux sends it when the
    starting *thread* ends, so only children started from the main thread are asked for it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the request took effect
            os._exit(1)

    return in_child
