"""What every configuration model shares: strict models, ids, addresses, fingerprints,
networks."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$"
"""Client and project ids: no underscore, because `_` separates the parts of a file name."""

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
EMAIL_PATTERN = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


def email_address(value: str) -> str:
    if not EMAIL_PATTERN.match(value):
        raise ValueError(f"{value!r} is not an email address")
    return value.lower()


class Model(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)

def _no_spaces(value: object) -> object:
    """Fingerprints are often pasted in groups of four; compare them without spaces."""
    return value.replace(" ", "").upper() if isinstance(value, str) else value


FINGERPRINT_PATTERN = r"^[0-9A-F]{40}$|^[0-9A-F]{64}$"
Fingerprint = Annotated[str, BeforeValidator(_no_spaces), Field(pattern=FINGERPRINT_PATTERN)]


def _networks(value: list[str]) -> list[str]:
    for net in value:
        ipaddress.ip_network(net, strict=False)
    return value


Networks = Annotated[list[str], AfterValidator(_networks)]  # IPs or CIDRs
