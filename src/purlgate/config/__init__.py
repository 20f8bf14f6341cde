"""regions.toml as pydantic models; only its ``loading`` module reads configuration files.

Layout (see the bundled ``regions.toml``)::

    [regions.<id>]                    one per instance: inbound addresses, data dir, links
    [regions.<id>.limits]             ZIP unwrap limits
    [clients.<id>]                    regions, senders, notification addresses, secrets
    [clients.<id>.projects.<id>]      columns, PURL name, error/flag files, dialect, render

Secrets are never values in the file: ``{ env = "NAME" }`` or ``{ file = "/path" }``.

The models live by what they describe (``clients``, ``regions``, ``secrets``, ``base``),
reading and validating a file in ``loading``; this package re-exports them, so callers
import from ``purlgate.config``.
"""

from __future__ import annotations

from purlgate.config.base import ID_PATTERN, Identifier
from purlgate.config.clients import (
    ClientConfig,
    ClientSftpConfig,
    ColumnSpec,
    Delimiter,
    Encoding,
    Output,
    ProjectConfig,
    RenderSettings,
    WebhookConfig,
    WebhookEvent,
    client_of_sender,
    is_loopback_host,
    origin,
)
from purlgate.config.loading import load_config, parse_config, secret_refs
from purlgate.config.regions import (
    Config,
    DatabaseConfig,
    DefenderConfig,
    DnsConfig,
    ImapConfig,
    LimitsConfig,
    PgpConfig,
    ProcessingConfig,
    RegionConfig,
    RelayConfig,
    SenderAuthConfig,
    SftpConfig,
    SmtpConfig,
    StoryboardConfig,
    WebConfig,
    WebhookDeliveryConfig,
    split_server,
)
from purlgate.config.secrets import SecretRef

__all__ = [
    "ID_PATTERN",
    "ClientConfig",
    "ClientSftpConfig",
    "ColumnSpec",
    "Config",
    "DatabaseConfig",
    "DefenderConfig",
    "Delimiter",
    "DnsConfig",
    "Encoding",
    "Identifier",
    "ImapConfig",
    "LimitsConfig",
    "Output",
    "PgpConfig",
    "ProcessingConfig",
    "ProjectConfig",
    "RegionConfig",
    "RelayConfig",
    "RenderSettings",
    "SecretRef",
    "SenderAuthConfig",
    "SftpConfig",
    "SmtpConfig",
    "StoryboardConfig",
    "WebConfig",
    "WebhookConfig",
    "WebhookDeliveryConfig",
    "WebhookEvent",
    "client_of_sender",
    "is_loopback_host",
    "load_config",
    "origin",
    "parse_config",
    "secret_refs",
    "split_server",
]
