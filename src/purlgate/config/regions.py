"""A region: its addresses, data folder and links, and each part it runs (limits,
processing, PGP, SMTP, relay, IMAP, SFTP, web, the render API); and the whole file."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator

from purlgate.config.base import Fingerprint, Identifier, Model, Networks, email_address
from purlgate.config.clients import ClientConfig
from purlgate.config.secrets import SecretRef
from purlgate.errors import ConfigError


class PgpConfig(Model):
    """The region's own key pair. One GNUPGHOME per instance (created 0700)."""

    fingerprint: Fingerprint  # our key, pinned: a keyring holding another key is refused
    private_key: SecretRef | None = None  # armored secret key; None: already in ``home``
    passphrase: SecretRef | None = None
    home: Path | None = None  # default: <data_dir>/gnupg
    sign_output: bool = False
    timeout_seconds: float = Field(default=600.0, gt=0)


class LimitsConfig(Model):
    max_uncompressed_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_compression_ratio: float = Field(default=250.0, gt=1)
    # Ratios of tiny members say nothing; a bomb must first get this big.
    ratio_check_after_bytes: int = Field(default=1024**2, ge=0)


class ProcessingConfig(Model):
    """How the workers take spooled mail and uploads."""

    # Entries handled at once. Each client has its own queue and the queues are served
    # in turn. Mail is handled in worker processes (its Python work holds the GIL);
    # "threads" keeps it in the gateway's process. SFTP uploads use threads.
    workers: int = Field(default=2, ge=1, le=64)
    mode: Literal["processes", "threads"] = "processes"
    # An entry that fails (not a storage fault) is tried this many times, with doubling
    # delays from retry_seconds, then moved to the dead-letter folder.
    max_attempts: int = Field(default=3, ge=1, le=20)
    retry_seconds: float = Field(default=5.0, gt=0, le=3600)
    # A mail worker process that holds this many MB more of its own memory than when it
    # took its first entry (what big files leave in its heap) is replaced by a fresh
    # one once none has an entry in hand. 0: never.
    recycle_mb: int = Field(default=20, ge=0, le=4096)


class SmtpConfig(Model):
    """The region's SMTP listener (the inbound addresses' MX points here)."""

    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    hostname: str = "purlgate.localhost"  # the name in our banner and Message-IDs
    max_message_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)  # below: 452, not 250
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_starttls: bool = False
    # As Postfix's smtpd_client_connection_count_limit and process limit: beyond, 421.
    max_connections: int = Field(default=100, gt=0)
    max_connections_per_ip: int = Field(default=10, gt=0)
    # A session that sends no command for this long is closed (421).
    timeout_seconds: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.require_starttls and self.tls_cert is None:
            raise ValueError("require_starttls needs tls_cert and tls_key")
        return self


class RelayConfig(Model):
    """Where replies and notifications go out: the relay, with a durable outbox."""

    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = False
    ca_file: Path | None = None  # CA bundle that signs the relay's certificate (else system)
    username: str | None = None
    password: SecretRef | None = None
    timeout_seconds: float = Field(default=60.0, gt=0)
    retry_first_seconds: float = Field(default=60.0, gt=0)  # then doubling
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    expire_seconds: float = Field(default=2 * 24 * 3600.0, gt=0)
    # Messages handed to the relay at once, each on its own connection (Postfix's
    # default_destination_concurrency_limit is 20).
    max_connections: int = Field(default=8, ge=1, le=100)
    # Retired: deliveries stream each message from its file (relay_data.py), so none
    # holds more than a few hundred kB whatever its size. Still read, so that a file
    # that sets it loads; check-config says it has no effect.
    max_inflight_bytes: int | None = None
    # A connection is kept open this long after a delivery for the next one (checked
    # with RSET first, as Postfix's connection cache does; its time limit is 2 s), and
    # is used for at most 300 s in all. 0: one connection per message.
    keep_connections_seconds: float = Field(default=2.0, ge=0, le=300)
    operator: str | None = None  # alerted when a message cannot be delivered
    # The largest message sent (besides the SIZE the relay announces, the smaller
    # wins): a reply past it goes out as a download link instead of an attachment.
    max_message_bytes: int | None = Field(default=None, ge=64 * 1024)

    @field_validator("operator")
    @classmethod
    def _operator(cls, value: str | None) -> str | None:
        return None if value is None else email_address(value)


class ImapConfig(Model):
    """Optional fallback: poll a mailbox that receives the inbound addresses' mail."""

    host: str
    port: int = Field(default=993, ge=1, le=65535)
    tls: Literal["ssl", "starttls", "none"] = "ssl"
    ca_file: Path | None = None  # CA bundle that signs the server's certificate (else system)
    user: str
    password: SecretRef
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    rejected_folder: str = "Rejected"
    poll_seconds: float = Field(default=30.0, gt=0)
    idle: bool = True  # use IDLE when the server offers it


class DefenderConfig(Model):
    """Brute-force defence per source IP, in the manner of SFTPGo's defender."""

    enabled: bool = True
    threshold: int = Field(default=15, gt=0)  # score at which the IP is banned
    score_invalid: int = Field(default=2, ge=0)  # a failed password
    score_no_auth: int = Field(default=2, ge=0)  # a connection that never logged in
    observation_seconds: float = Field(default=1800.0, gt=0)
    ban_seconds: float = Field(default=1800.0, gt=0)
    ban_increase: float = Field(default=1.5, ge=1.0)  # each repeat ban lasts this much longer
    safelist: Networks = Field(default_factory=list)  # IPs or CIDRs never banned


class SftpConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=2222, ge=0, le=65535)
    host_key: Path | None = None  # default: <data_dir>/ssh_host_ed25519_key, made once
    login_timeout_seconds: float = Field(default=30.0, gt=0)
    # Temporary-named uploads never renamed (an abandoned resume) go after this long.
    temp_max_age_hours: float = Field(default=24.0, gt=0)
    defender: DefenderConfig = Field(default_factory=DefenderConfig)


class WebConfig(Model):
    """The region's HTTP side: what the links serve, and the operations pages."""

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # No certificate at hand (a demo, a laptop): make a self-signed one once in data_dir.
    self_signed: bool = False
    render_workers: int = Field(default=1, ge=1, le=64)  # processes drawing media
    render_queue: int = Field(default=256, ge=1)  # first views waiting; beyond: 503
    # One thumbnail or video may take this long; past it, its worker is replaced (503).
    render_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # The render processes start at the first render and stop this long after the
    # last one (Postfix's max_idle is 100 s): an idle region holds none.
    render_idle_seconds: float = Field(default=100.0, gt=0, le=86400)
    # A connection that does not finish a request's headers this long after it opened
    # or after its last answer (a slow sender, an idle keep-alive) is closed.
    idle_timeout_seconds: float = Field(default=15.0, gt=0, le=600)
    cache_dir: Path | None = None  # rendered media; default: <data_dir>/renders
    # A reply too big for the relay: its ZIP is downloaded from a link this long.
    download_hours: float = Field(default=72.0, gt=0, le=24 * 90)
    # /readyz, /metrics and the batch view: from these networks, or with the password.
    ops_networks: Networks = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    ops_user: str = "ops"
    ops_password: SecretRef | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.self_signed and self.tls_cert is not None:
            raise ValueError("self_signed and tls_cert exclude each other")
        return self


class StoryboardConfig(Model):
    """The platform's render API for this region (projects with backend storyboard-api)."""

    base_url: str
    username: str
    password: SecretRef
    ca_file: Path | None = None
    concurrency: int = Field(default=8, ge=1, le=256)  # requests in flight
    requests_per_second: float = Field(default=10.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)  # per HTTP request
    max_attempts: int = Field(default=5, ge=1)  # per request, on timeouts, 5xx and 429
    backoff_first_seconds: float = Field(default=1.0, ge=0)
    backoff_max_seconds: float = Field(default=60.0, gt=0)
    poll_seconds: float = Field(default=2.0, gt=0)
    render_timeout_seconds: float = Field(default=3600.0, gt=0)  # one row, ready or failed

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s?#]+", value):
            raise ValueError("must be an http(s):// URL without query or fragment")
        return value.rstrip("/")


class DnsConfig(Model):
    """Where sender checks (SPF, DKIM, DMARC, ARC) look names up."""

    servers: list[str] = Field(default_factory=list)  # "ip" or "ip:port"; none: the system's
    timeout_seconds: float | None = Field(default=None, gt=0, le=60)  # None: the system's

    @field_validator("servers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for server in value:
            host, port = split_server(server)
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ValueError(f"{server!r}: give an IP address, optionally :port") from exc
            if not 0 < port < 65536:
                raise ValueError(f"{server!r}: the port must be 1-65535")
        return value


def split_server(server: str) -> tuple[str, int]:
    """("ip", port) of "ip", "ip:port" or "[v6]:port" (port 53 by default)."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+)(?::(\d+))?|([0-9a-fA-F:]+)", server)
    if match is None:
        return server, 53
    v6, v6_port, v4, v4_port, bare = match.groups()
    host = v6 or v4 or bare or server
    port = v6_port or v4_port
    return host, int(port) if port else 53


class SenderAuthConfig(Model):
    """How the region learns who really sent a mail (see the README's sender checks)."""

    # The id our own verdicts are recorded under (default: smtp.hostname).
    authserv_id: str | None = None
    # Behind a trusted MTA (Postfix with OpenDKIM/OpenDMARC, rspamd) or for the IMAP
    # mailbox: its Authentication-Results header (the topmost one with this id) is
    # read instead of checking here; every other such header is ignored.
    trusted_authserv_id: str | None = None
    # Domains whose ARC seal vouches for a forward (a list, a forwarding service) that
    # broke SPF and DKIM alignment: a DMARC failure they sealed as a pass is a pass.
    trusted_arc_sealers: list[str] = Field(default_factory=list)


class WebhookDeliveryConfig(Model):
    """How the region delivers its clients' webhooks: from a durable queue, retried with
    doubling delays until ``expire_seconds`` (then dead-lettered, the operator alerted)."""

    timeout_seconds: float = Field(default=10.0, gt=0, le=120)  # per attempt, in all
    retry_first_seconds: float = Field(default=30.0, gt=0)  # then doubling
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    expire_seconds: float = Field(default=3 * 24 * 3600.0, gt=0)
    max_connections: int = Field(default=4, ge=1, le=64)  # attempts at once
    ca_file: Path | None = None  # CA bundle for receivers' certificates (else the system's)


class DatabaseConfig(Model):
    """The region's shared database (PostgreSQL): what several instances agree on. Absent:
    SQLite in ``data_dir``, one instance."""

    url: SecretRef  # postgresql://user:password@host/db: a secret, it holds a password
    lease_seconds: float = Field(default=30.0, ge=2, le=3600)  # a dead instance's work
    pool_size: int = Field(default=8, ge=2, le=100)  # connections per process, at most
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)


class RegionConfig(Model):
    inbound_addresses: list[str] = Field(min_length=1)
    data_dir: Path
    public_base_url: str
    token_key: SecretRef | None = None
    rows_key: SecretRef | None = None  # seals the row store; default: data_dir/rows.key
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    pgp: PgpConfig | None = None
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    imap: ImapConfig | None = None
    sftp: SftpConfig | None = None
    web: WebConfig | None = None
    storyboard: StoryboardConfig | None = None
    database: DatabaseConfig | None = None
    webhooks: WebhookDeliveryConfig = Field(default_factory=WebhookDeliveryConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    sender_auth: SenderAuthConfig = Field(default_factory=SenderAuthConfig)
    # Mode of PURL, flag and error files (octal): the owner writes, its group may read.
    results_mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0640"

    @model_validator(mode="after")
    def _render_api_alerts(self) -> Self:
        if self.storyboard is not None and self.relay.operator is None:
            raise ValueError("a storyboard (render API) section needs relay.operator: refused "
                             "credentials stop batches and the operator must hear of it")
        return self

    @field_validator("inbound_addresses")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        return [email_address(v) for v in value]

    @field_validator("public_base_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/-]*)?", value):
            raise ValueError(
                "must be an https:// URL without query, fragment or special characters"
            )
        return value.rstrip("/")


class Config(Model):
    regions: dict[Identifier, RegionConfig] = Field(min_length=1)
    clients: dict[Identifier, ClientConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _clients_in_known_regions(self) -> Self:
        for client_id, client in self.clients.items():
            unknown = [r for r in client.regions if r not in self.regions]
            if unknown:
                raise ValueError(
                    f"client {client_id}: unknown region(s) {', '.join(unknown)}; "
                    f"known: {', '.join(self.regions)}"
                )
            if client.pgp_fingerprint is not None:
                keyless = [r for r in client.regions if self.regions[r].pgp is None]
                if keyless:
                    raise ValueError(
                        f"client {client_id} has a PGP key but region(s) {', '.join(keyless)} "
                        "have no [regions.<id>.pgp] key pair"
                    )
            for project_id, project in client.projects.items():
                if project.pgp_encrypt_output:
                    # A key that can no longer be encrypted to fails batches with "our
                    # operators have been alerted": someone must be.
                    unalerted = [r for r in client.regions
                                 if self.regions[r].relay.operator is None]
                    if unalerted:
                        raise ValueError(
                            f"client {client_id}, project {project_id} encrypts its results "
                            f"but region(s) {', '.join(unalerted)} have no relay.operator "
                            "to alert when the client's key stops working")
                if project.render.backend != "storyboard-api":
                    continue
                missing = [r for r in client.regions if self.regions[r].storyboard is None]
                if missing:
                    raise ValueError(
                        f"client {client_id}, project {project_id} renders with the "
                        f"storyboard-api but region(s) {', '.join(missing)} have no "
                        "[regions.<id>.storyboard] section"
                    )
        return self

    @model_validator(mode="after")
    def _unique_sftp_usernames(self) -> Self:
        seen: dict[str, str] = {}
        for client_id, client in self.clients.items():
            if client.sftp is None:
                continue
            other = seen.setdefault(client.sftp.username, client_id)
            if other != client_id:
                raise ValueError(f"clients {other} and {client_id} share the SFTP username "
                                 f"{client.sftp.username}")
        return self

    def region(self, region_id: str) -> RegionConfig:
        """The region ``region_id``; a ConfigError naming the configured ones if none."""
        if region_id not in self.regions:
            raise ConfigError(f"no region {region_id!r}; configured: {', '.join(self.regions)}")
        return self.regions[region_id]

    def clients_of(self, region_id: str) -> dict[str, ClientConfig]:
        return {cid: c for cid, c in self.clients.items() if region_id in c.regions}

    def client_keys(self, region_id: str) -> dict[str, tuple[Path, str]]:
        """The pinned PGP public key (file, fingerprint) of each client of the region
        that has one."""
        return {cid: (c.pgp_public_key, c.pgp_fingerprint)
                for cid, c in self.clients_of(region_id).items()
                if c.pgp_public_key is not None and c.pgp_fingerprint is not None}
