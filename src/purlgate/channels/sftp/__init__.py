"""The SFTP channel: per-client accounts, Uploads in, Downloads out (asyncssh).

Each client sees only its own tree, ``/<project>/Uploads`` and ``/<project>/Downloads``
(or ``/Uploads`` and ``/Downloads`` for a flat one-project account). No path leads out:
``..`` is refused, every component is checked with lstat so a planted symlink is
refused too, and symlinks cannot be made. ``Uploads``: create, write, rename, list.
``Downloads``: list, read, delete. Nothing else.

An upload counts when the client closes a file it wrote under a final name, or renames
a temporary name (``.filepart``, ``.part``, ``.tmp``, a leading dot: WinSCP, FileZilla)
to a final one. Before that close or rename is answered OK, the file is moved into the
durable SFTP spool (fsynced, renamed, folder fsynced). A transfer cut off mid-way (the
connection drops with the file open) is deleted, never processed. A name already
received for the client and project, or being received in another session, is refused
at open with the time it arrived.

Its rooms, one job each: ``host_key`` (the region's SSH host key), ``spool`` (completed
uploads, durable), ``service`` (accounts, homes, names being received), ``session`` (the
SSH/SFTP protocol: logins, the chrooted tree, completion) and ``worker`` (the batch core
on spooled uploads, results into Downloads). It imports no other channel (SMTP, IMAP,
the mail worker); its operator alerts go out through the shared outbox.
"""

from purlgate.channels.sftp.host_key import load_or_create_host_key
from purlgate.channels.sftp.service import SftpService
from purlgate.channels.sftp.session import close_sessions, start_sftp
from purlgate.channels.sftp.spool import SftpSpool, Upload
from purlgate.channels.sftp.worker import SftpWorker

__all__ = ["SftpService", "SftpSpool", "SftpWorker", "Upload", "close_sessions",
           "load_or_create_host_key", "start_sftp"]
