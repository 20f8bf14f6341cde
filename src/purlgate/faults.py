"""Crash points for the crash tests: ``PURLGATE_CRASH_AT=<point>`` kills the process with
SIGKILL the first time it reaches that point, as a power cut or the OOM killer would.

Points: ``spool-committed`` (the message is on disk, 250 not said yet),
``batch-running`` (mid-batch, after the first rows), ``batch-ended`` (its end recorded,
its events not yet published: notifications, webhooks), ``purl-published`` (the PURL file is
out, the reply not queued), ``outbox-queued`` (an outbox entry is queued, the spool
entry not yet finished), ``relay-accepted`` (the relay said 250, "sent" not recorded). Unset in
production: one dictionary look-up per point. In a mail worker process the gateway
(``PURLGATE_MAIN_PID``) is killed first: the crash is of the whole service, as a power
cut would be.
"""

from __future__ import annotations

import os
import signal

CRASH_AT = os.environ.get("PURLGATE_CRASH_AT")


def crash_point(name: str) -> None:
    if name == CRASH_AT:
        main = int(os.environ.get("PURLGATE_MAIN_PID", "0"))
        if main and main != os.getpid():
            os.kill(main, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
