"""Sender checks as the channels see them: the verdicts, what a client's policy makes
of them, and what a checker offers.

``decide`` turns verdicts and a client's policy into a refusal or nothing: a
``550 5.7.x`` naming the failed check and what the client's mail administrator must
fix, or ``451 4.4.3`` when DNS did not answer (never a silent pass). The checker
itself (``sender_checks.LazyChecks`` around ``sender_auth.SenderChecks``) is loaded at
the first message that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Literal, Protocol

Policy = Literal["record", "require-dmarc", "require-dkim"]


@dataclass(frozen=True)
class Verdicts:
    by: str  # the authserv-id that made them (ours, or the trusted MTA's)
    from_domain: str | None
    spf: str = "none"  # pass fail softfail neutral none temperror permerror
    spf_domain: str | None = None  # of MAIL FROM
    dkim: tuple[tuple[str, str], ...] = ()  # (d=, result) of each signature
    dkim_aligned: bool = False  # a DKIM pass aligned with the From domain
    dmarc: str = "none"  # pass fail none temperror permerror
    dmarc_policy: str | None = None  # none quarantine reject
    arc: str = "none"  # pass fail none
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line for the log and the batch record (no local parts, no row data)."""
        dkim_part = ",".join(f"{r}({d})" for d, r in self.dkim) or "none"
        text = (f"spf={self.spf} dkim={dkim_part} dmarc={self.dmarc}"
                f"{f'(p={self.dmarc_policy})' if self.dmarc_policy else ''} arc={self.arc}"
                f" from={self.from_domain or '-'} by={self.by}")
        return text + "".join(f" [{n}]" for n in self.notes)


@dataclass(frozen=True)
class Refusal:
    smtp: str  # the SMTP answer
    reason: str  # what failed and what to fix, for a reply and the log

    @property
    def temporary(self) -> bool:
        return self.smtp.startswith("4")


TEMPORARY = ("451 4.4.3 Could not check who sent this message (DNS did not answer); "
             "please try again later")


def decide(policy: Policy, verdicts: Verdicts) -> Refusal | None:
    """What ``policy`` makes of ``verdicts``: None to accept, else the refusal."""
    if policy == "record":
        return None
    domain = verdicts.from_domain or "the From domain"
    if policy == "require-dmarc":
        return _dmarc_refusal(verdicts, domain)
    if verdicts.dkim_aligned:
        return None
    if any(r == "temperror" for _d, r in verdicts.dkim):
        return Refusal(TEMPORARY, "DKIM could not be checked: DNS did not answer")
    if not verdicts.dkim:
        why = (f"the message has no DKIM signature; this account requires mail signed "
               f"with DKIM for {domain}: your mail administrator must turn on DKIM "
               f"signing for {domain}")
        return Refusal(f"550 5.7.20 {_one_line(why)}", why)
    if any(r == "pass" for _d, r in verdicts.dkim):
        signers = ", ".join(sorted({d for d, r in verdicts.dkim if r == "pass"}))
        why = (f"no valid DKIM signature matches the From domain {domain} (signed by "
               f"{signers}); your mail administrator must sign with d={domain}")
        return Refusal(f"550 5.7.22 {_one_line(why)}", why)
    why = (f"the DKIM signature did not verify; your mail administrator must check the "
           f"DKIM key published for {domain} and that nothing rewrites the message")
    return Refusal(f"550 5.7.20 {_one_line(why)}", why)


def _dmarc_refusal(verdicts: Verdicts, domain: str) -> Refusal | None:
    if verdicts.dmarc == "pass":
        return None
    if verdicts.dmarc == "temperror":
        return Refusal(TEMPORARY, "DMARC could not be checked: DNS did not answer")
    if verdicts.dmarc == "none":
        why = (f"{domain} publishes no DMARC policy, which this account requires: your "
               f"mail administrator must publish one at _dmarc.{domain}")
    elif verdicts.dmarc == "permerror":
        why = "the message must have exactly one From address for DMARC to be checked"
    else:
        why = (f"DMARC failed for {domain} (SPF {verdicts.spf}, DKIM "
               f"{'none' if not verdicts.dkim else 'not aligned'}): your mail "
               f"administrator must sign mail for {domain} with DKIM, or send it from "
               f"servers {domain}'s SPF record lists")
    return Refusal(f"550 5.7.26 {_one_line(why)}", why)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]



class Checks(Protocol):
    """The region's sender checks (``sender_checks.LazyChecks``)."""

    authserv_id: str

    @property
    def trusts_headers(self) -> bool: ...

    def verify(self, source: BinaryIO | bytes, *, ip: str | None, helo: str | None,
               mail_from: str) -> Verdicts: ...

    def from_headers(self, headers: bytes) -> Verdicts: ...
