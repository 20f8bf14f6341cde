"""What we mail back: threaded replies with an AES-256 ZIP, and batch notifications.

Replies go to the client's registered address that sent the message (never Reply-To),
threaded with ``Re:``, In-Reply-To and References. Bodies carry status and counts,
never row data. The ZIP is encrypted with the client's own password using WinZip AES
256 (pyzipper), which 7-Zip, WinZip, The Unarchiver and Keka open; macOS's Archive
Utility and older Windows Explorer cannot, and the reply says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.contentmanager import raw_data_manager
from email.message import EmailMessage
from email.policy import Compat32
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from purlgate.core.archive import aes_zip
from purlgate.core.lifecycle import BatchEvent, BatchRecord, BatchState, EventKind

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class _MailPolicy(Compat32):
    """How we build our own mail: the email package's compat32 rules (headers kept as
    the strings we set; RFC 2047 and RFC 2231 only where a value is not ASCII), which
    cost a quarter of the default policy's header parsing per message, with CRLF line
    ends as on the wire. A header value never carries a line break or other control
    character (a subject or a file name from a client could): each run of them becomes
    one space, so no header can be smuggled in."""

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if isinstance(value, str):
            value = _CONTROL.sub(" ", value)
        return name, value

    # An ASCII value that fits on its line comes out as it is: the email package's
    # Header folding (slow) gives the same, which tests/test_replies.py checks.
    def _fits(self, name: str, value: Any) -> bool:
        return (isinstance(value, str) and value.isascii()
                and len(name) + 2 + len(value) <= (self.max_line_length or 78))

    def fold(self, name: str, value: Any) -> str:
        if self._fits(name, value):
            return f"{name}: {value}{self.linesep}"
        return super().fold(name, value)

    def fold_binary(self, name: str, value: Any) -> bytes:
        if self._fits(name, value):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


MAIL_POLICY = _MailPolicy(linesep="\r\n")


def new_message() -> EmailMessage:
    """An empty message of ours (see ``_MailPolicy``); fill it with ``set_text`` and
    ``attach``."""
    return EmailMessage(policy=MAIL_POLICY)


def set_text(message: EmailMessage, text: str) -> None:
    message.set_content(text, content_manager=raw_data_manager)


def attach(message: EmailMessage, data: bytes, *, maintype: str, subtype: str,
           filename: str) -> None:
    message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename,
                           content_manager=raw_data_manager)


# Stands for a reply's ZIP in the message we build; the outbox writes the ZIP (base64,
# read from disk piece by piece) where its one line is, so no reply is held in memory.
PLACEHOLDER = b"purlgate: the AES ZIP is written from disk here."


@dataclass(frozen=True)
class Reply:
    """A reply: the message, and the ZIP on disk that stands where PLACEHOLDER is."""

    message: EmailMessage
    attachment: Path | None = None


# Offered the ZIP a reply is about to attach (its path, its name in the mail): None to
# attach it, or the sentence that stands instead (it was moved where the client can
# download it: it is too big for mail).
Stash = Callable[[Path, str], str | None]


def _zip(files: Sequence[Path], password: bytes, scratch: Path) -> tuple[Path, str]:
    """The reply's AES ZIP of ``files`` in ``scratch``, and its name in the mail."""
    target = scratch / "reply.zip"
    aes_zip(files, password, target)
    return target, f"{files[0].name.rsplit('.', 1)[0]}.zip"


def _attached(reply: EmailMessage, target: Path, zip_name: str, link: str | None) -> Reply:
    if link is not None:
        return Reply(reply)  # the ZIP was moved for its download
    attach(reply, PLACEHOLDER, maintype="application", subtype="zip", filename=zip_name)
    return Reply(reply, target)


def _threaded(original: EmailMessage | None, *, sender: str, to: str,
              fallback_subject: str) -> EmailMessage:
    reply = new_message()
    reply["From"] = sender
    reply["To"] = to
    subject = str(original.get("Subject", "")).strip() if original is not None else ""
    subject = subject or fallback_subject
    reply["Subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
    reply["Message-ID"] = make_msgid(domain=sender.rsplit("@", maxsplit=1)[-1])
    parent = str(original.get("Message-ID", "")).strip() if original is not None else ""
    if parent:
        reply["In-Reply-To"] = parent
        references = str(original.get("References", "")).split() if original else []
        reply["References"] = " ".join([*references, parent])
    return reply


def _summary(batch: BatchRecord) -> str:
    """The batch in a few lines, with the SHA-256 of the file we received and of the
    PURL file we made, so the client can check both (``sha256sum``, ``Get-FileHash``)."""
    c = batch.counts
    return (f"Batch: {batch.id} (project {batch.project or '-'})\n"
            f"File: {batch.data_name or batch.received_name}\n"
            f"Status: {batch.state}\n"
            f"Rows read: {c.rows_total}; in the PURL file: {c.rows_ok}; "
            f"with errors: {c.rows_error}\n"
            + (f"SHA-256 of the file we received ({batch.received_name}): {batch.sha256}\n"
               if batch.sha256 else "")
            + (f"SHA-256 of the PURL file we made: {batch.purl_sha256}\n"
               if batch.purl_sha256 else ""))


def success_reply(original: EmailMessage | None, batch: BatchRecord, files: Sequence[Path],
                  password: bytes, *, sender: str, to: str, scratch: Path,
                  stash: Stash | None = None) -> Reply:
    reply = _threaded(original, sender=sender, to=to, fallback_subject="your data file")
    names = ", ".join(p.name for p in files)
    target, zip_name = _zip(files, password, scratch)
    link = stash(target, zip_name) if stash is not None else None
    where = (f"The attached ZIP holds {names}." if link is None else
             f"The ZIP {zip_name} holds {names}. {link}")
    set_text(
        reply,
        "Your data file was processed.\n\n" + _summary(batch) +
        f"\n{where} It is protected with the same password as the "
        "file you sent, with AES-256 encryption: open it with 7-Zip or WinZip (Windows), "
        "The Unarchiver or Keka (macOS), or 7z from p7zip (Linux). macOS's "
        "built-in Archive Utility and older versions of Windows Explorer cannot open "
        "AES-encrypted ZIPs.\n"
    )
    return _attached(reply, target, zip_name, link)


def name_sentence(batch: BatchRecord) -> str:
    """Whether the client may send the same file name again, in plain words."""
    if batch.error_code == "duplicate-name":
        return "The file name is taken by the earlier file: use a new name.\n"
    return ("The file name is free again: you may send the corrected file under the same "
            "name.\n")


def failure_reply(original: EmailMessage | None, reason: str, *, sender: str, to: str,
                  batch: BatchRecord | None = None, errors: Path | None = None,
                  password: bytes | None = None, scratch: Path | None = None,
                  stash: Stash | None = None) -> Reply:
    """The failure and what to fix; the error list attached (AES ZIP) when there is one."""
    reply = _threaded(original, sender=sender, to=to, fallback_subject="your data file")
    reference = f"\nReference: batch {batch.id}\n" if batch is not None else ""
    if batch is not None and batch.sha256:  # what we received, for the client to check
        reference += f"SHA-256 of the file we received ({batch.received_name}): {batch.sha256}\n"
    listed = ""
    zipped: tuple[Path, str, str | None] | None = None
    if errors is not None and password is not None and scratch is not None:
        target, zip_name = _zip([errors], password, scratch)
        link = stash(target, zip_name) if stash is not None else None
        zipped = target, zip_name, link
        listed = (f"\nThe {'attached ZIP' if link is None else 'ZIP ' + zip_name} holds "
                  f"{errors.name}, every error of the file (row, column, reason), with the "
                  "same password as the file you sent." + (f" {link}" if link else "")
                  + "\n")
    set_text(
        reply,
        "Your data file could not be processed.\n\n"
        f"What to fix: {reason}.\n" + reference + listed +
        "\nNothing from this message was processed. Please send a new message with the "
        "corrected file.\n" + (name_sentence(batch) if batch is not None else "")
    )
    if zipped is not None:
        return _attached(reply, *zipped)
    return Reply(reply)


def validation_reply(original: EmailMessage | None, report: str, errors: Path | None, *,
                     password: bytes, sender: str, to: str, scratch: Path,
                     stash: Stash | None = None) -> Reply:
    """The answer to a message sent to the validate address: the report (core/validation
    ``describe``), and the error file (AES ZIP, the client's password) when there is one."""
    reply = _threaded(original, sender=sender, to=to, fallback_subject="your data file")
    if errors is None:
        set_text(reply, "Your data file was checked.\n\n" + report)
        return Reply(reply)
    target, zip_name = _zip([errors], password, scratch)
    link = stash(target, zip_name) if stash is not None else None
    listed = (f"\nThe {'attached ZIP' if link is None else 'ZIP ' + zip_name} holds "
              f"{errors.name} (row, column, reason), with the same password as the file you "
              "sent." + (f" {link}" if link else "") + "\n")
    set_text(reply, "Your data file was checked.\n\n" + report + listed)
    return _attached(reply, target, zip_name, link)


def fault_reply(original: EmailMessage | None, *, sender: str, to: str, reference: str,
                alerted: bool) -> EmailMessage:
    """A message we could not process through no fault of the client's."""
    reply = _threaded(original, sender=sender, to=to, fallback_subject="your data file")
    then = ("Our operators have been alerted and will process it once the fault is fixed; "
            "you will then get the result in a further reply, so you need not send it "
            "again.\n" if alerted else
            "Please send it again later in a new message.\n")
    set_text(
        reply,
        "We could not process your message because of a fault on our side, not because of "
        f"anything in it. Nothing from it was processed.\n\nReference: {reference}\n\n"
        + then
    )
    return reply


SUBJECTS = {
    EventKind.LOADED: "batch loaded",
    EventKind.SUMMARY: "batch done",
    EventKind.FAILED: "batch failed",
}


def notification(event: BatchEvent, *, sender: str, to: Sequence[str]) -> EmailMessage:
    batch = event.batch
    title = SUBJECTS[event.kind]
    if event.kind is EventKind.SUMMARY and batch.state is BatchState.DONE_WITH_ERRORS:
        title = "batch done with errors"
    message = new_message()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = f"[purlgate] {title}: {batch.data_name or batch.received_name}"
    reason = (f"Reason: {batch.reason}\n{name_sentence(batch)}"
              if event.kind is EventKind.FAILED else "")
    set_text(
        message,
        f"purlgate {title} for client {batch.client}.\n\n" + _summary(batch) + reason +
        f"Channel: {batch.channel}\n"
    )
    return message
