"""A queued message as it goes to the relay: read from its outbox file a piece at a time
and written to the connection as it is read, never held whole.

aiosmtplib's ``sendmail`` takes the message as one bytes object and copies it about
three times (line ends, dot-stuffing, the final dot) before its transport buffers it
whole: a 27 MB reply cost about 110 MB while it went, and a byte budget could only make
big replies wait their turn. Here the envelope goes through aiosmtplib's own commands
(MAIL with SIZE, RCPT, DATA) and the body follows in ``PIECE``-sized writes, each made
as Postfix's smtp client would (CRLF line ends, a dot at a line's start doubled), with
the transport's flow control between them: one delivery holds about two pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from purlgate.channels.outbox_files import read_envelope

PIECE = 256 * 1024
LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")  # as aiosmtplib's: a lone CR or LF becomes CRLF
LINE_DOT = re.compile(rb"(?m)^\.")


@dataclass(frozen=True)
class Outgoing:
    """A message in an outbox entry file: its bytes from ``start`` (past the envelope
    line) to the end, ``size`` of them, as sent."""

    path: Path
    start: int
    size: int

    @classmethod
    def of_entry(cls, path: Path) -> Outgoing:
        _, start = read_envelope(path)
        return cls(path, start, path.stat().st_size - start)

    def open(self) -> BinaryIO:
        f = self.path.open("rb")
        f.seek(self.start)
        return f

    def read(self) -> bytes:
        """The whole message (a small one; tests)."""
        with self.open() as f:
            return f.read()


class DataEncoder:
    """A message's bytes made into what follows DATA, a piece at a time: the same bytes
    aiosmtplib's ``execute_data_command`` writes for the whole message (CRLF line ends,
    a final CRLF, leading dots doubled, the closing dot), whatever the pieces' size."""

    def __init__(self, source: BinaryIO, piece: int = PIECE) -> None:
        self.source = source
        self.piece = piece
        self._carry = b""  # the end of the last read, past its last line end
        self._line_start = True  # the bytes given so far end a line (or there are none)
        self._ends_crlf = False  # they end with CRLF
        self._done = False

    @property
    def finished(self) -> bool:
        """The closing dot was given."""
        return self._done

    def next(self) -> bytes:
        """The next bytes to write; b"" once the closing dot was given."""
        if self._done:
            return b""
        while read := self.source.read(self.piece):
            chunk = self._carry + read
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a piece: all of it but a CR that may pair
                cut = len(chunk) - chunk.endswith(b"\r")
            chunk, self._carry = chunk[:cut], chunk[cut:]
            if chunk:
                return self._encode(chunk)
        chunk, self._done = self._carry, True
        out = self._encode(chunk)
        if not self._ends_crlf:
            out += b"\r\n"
        return out + b".\r\n"

    def _encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = LINE_DOT.sub(b"..", LINE_ENDS.sub(b"\r\n", chunk))
        if not self._line_start and chunk.startswith(b"."):
            out = out[1:]  # mid-line: that dot does not start a line
        self._line_start = self._ends_crlf = out.endswith(b"\r\n")
        return out


async def send_streamed(client: aiosmtplib.SMTP, source: BinaryIO, size: int, *,
                        sender: str, recipients: list[str], timeout: float) -> None:
    """One mail transaction with the message read from ``source`` (``size`` bytes, from
    ``Outgoing.open``) as it is written.

    Raises what ``SMTP.sendmail`` raises, and resets the envelope as it does after a
    refusal (the connection can then carry the next message).
    """
    try:
        await _envelope(client, size, sender=sender, recipients=recipients, timeout=timeout)
        await _body(client, source, timeout)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.rset(timeout=timeout)
        raise


async def _envelope(client: aiosmtplib.SMTP, size: int, *, sender: str,
                    recipients: list[str], timeout: float) -> None:
    """MAIL (with the message's SIZE when the relay takes it), RCPT for each recipient
    (refused ones skipped while one is taken), DATA until its 354."""
    if client.is_ehlo_or_helo_needed:  # (else SIZE is not known to be taken yet)
        try:
            await client.ehlo(timeout=timeout)
        except aiosmtplib.SMTPHeloError:
            await client.helo(timeout=timeout)
    options = [f"SIZE={size}"] if client.supports_extension("size") else []
    await client.mail(sender, options=options, timeout=timeout)
    refused: list[aiosmtplib.SMTPRecipientRefused] = []
    for recipient in recipients:
        try:
            await client.rcpt(recipient, timeout=timeout)
        except aiosmtplib.SMTPRecipientRefused as exc:
            refused.append(exc)
    if len(refused) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(refused)
    start = await client.execute_command(b"DATA", timeout=timeout)
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)


async def _body(client: aiosmtplib.SMTP, source: BinaryIO, timeout: float) -> None:
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # Waiting for the answer from the start: a relay that refuses before the end (and
    # closes) is heard, not taken for a lost connection.
    answer = asyncio.ensure_future(protocol.read_response(timeout=None))
    await asyncio.sleep(0)
    try:
        encoder = DataEncoder(source)
        try:
            while not answer.done() and (out := await asyncio.to_thread(encoder.next)):
                protocol.write(out)
                await asyncio.wait_for(_drained(protocol), timeout)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            pass  # hung up: the answer it gave first (if any) says why, read below
        early = not encoder.finished
        response = await asyncio.wait_for(answer, timeout)
    except aiosmtplib.SMTPException:
        client.close()
        raise
    except TimeoutError as exc:
        client.close()
        raise aiosmtplib.SMTPTimeoutError("the relay took no more of the message") from exc
    except OSError as exc:
        client.close()
        raise aiosmtplib.SMTPServerDisconnected(f"Connection lost ({type(exc).__name__})") \
            from exc
    finally:
        if not answer.done():
            answer.cancel()
        elif not answer.cancelled():
            answer.exception()  # retrieved: read above, or the failure that ended it
    if early:  # an answer before the closing dot: the rest would be taken for commands
        client.close()
    if early or response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)


async def _drained(protocol: SMTPProtocol) -> None:
    """Until the transport took what was written (below its high-water mark): the flow
    control aiosmtplib's protocol keeps from asyncio's streams (``FlowControlMixin``:
    what ``StreamWriter.drain`` awaits)."""
    await protocol._drain_helper()
