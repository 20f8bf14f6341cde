"""What the mail worker processes' forkserver holds before it forks them.

Imported only in that forkserver (``set_forkserver_preload``, see ``mail_process``),
never by ``serve`` itself: the workers are forked from a process that has already
imported the mail path and the libraries a message may need (Arrow, pydantic, the
sender checks' DNS, SPF and DKIM libraries, pyzipper's ciphers), so those pages are
shared by every worker instead of each spawned worker importing its own copy.
``gc.freeze`` then keeps the cyclic collector off them: its passes write to every
object they visit, and each write would copy a shared page into the worker.

The forkserver dies with ``serve`` (its parent; it is started from the event loop
thread, which lasts as long as the process) and the workers die with the forkserver,
so a kill -9 of ``serve`` takes the whole tree with it.
"""

from __future__ import annotations

import gc
import os

from purlgate.lifeline import die_with_parent

PID = os.getpid()  # the workers' parent: what they check after their own prctl
# (Should serve die before this line, the forkserver still ends: it reads EOF from
# serve on its "alive" pipe.)
die_with_parent()

# What a worker builds and runs, loaded once here.
import purlgate.channels.mail_process  # noqa: E402
import purlgate.channels.sender_auth  # noqa: E402
import purlgate.mail_side  # noqa: E402, F401
from purlgate.core.archive import aes_zip, read_zip  # noqa: E402

# An AES ZIP made and read: pyzipper's ciphers, hashes and key derivation load their
# native parts at first use (through cffi, which parses their C declarations then).
read_zip(aes_zip({"warm.csv": b"a\n"}, b"warm"), b"warm")

gc.collect()
gc.freeze()
