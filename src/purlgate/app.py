"""Wiring: build a region's pieces from the configuration.

The only place that turns config into live objects (store, renderer, processor). The
channels added later are started here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from purlgate.config import Config, RegionConfig
from purlgate.core.archive import UnwrapLimits
from purlgate.core.pipeline import BatchProcessor, Subscriber
from purlgate.core.render import Renderer
from purlgate.errors import ConfigError
from purlgate.pgp import GpgKeyStore
from purlgate.renderers.embedded import EmbeddedRenderer, load_or_create_key, parse_key
from purlgate.store import SqliteBatchStore


def use_jemalloc() -> None:
    """Prefer Arrow's jemalloc pool: it hands freed blocks back, where the default
    mimalloc pool kept ~35 MB more at peak in bench/core.py. Builds without it keep
    their default."""
    # pyarrow.lib.ArrowNotImplementedError subclasses NotImplementedError.
    with contextlib.suppress(NotImplementedError):
        pa.set_memory_pool(pa.jemalloc_memory_pool())


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Region:
    id: str
    config: RegionConfig
    data_dir: Path
    store: SqliteBatchStore
    processor: BatchProcessor
    keys: GpgKeyStore | None = None

    def close(self) -> None:
        if self.keys is not None:
            self.keys.close()


def token_key(region: RegionConfig, data_dir: Path) -> bytes:
    if region.token_key is not None:
        return parse_key(region.token_key.reveal())
    return load_or_create_key(data_dir / "token.key")


def build_region(
    config: Config,
    region_id: str,
    *,
    data_dir: Path | None = None,
    subscribers: Sequence[Subscriber] = (),
) -> Region:
    if region_id not in config.regions:
        raise ConfigError(f"no region {region_id!r}; configured: {', '.join(config.regions)}")
    region = config.regions[region_id]
    use_jemalloc()
    data_dir = data_dir or region.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteBatchStore(data_dir / "batches.sqlite3")
    embedded = EmbeddedRenderer(token_key(region, data_dir), region.public_base_url)
    clients = config.clients_of(region_id)

    def renderer_for(client_id: str, project_id: str) -> Renderer:
        backend = clients[client_id].projects[project_id].render.backend
        if backend == "embedded":
            return embedded
        raise ConfigError(f"render backend {backend!r} is not available")

    limits = UnwrapLimits(
        max_uncompressed_bytes=region.limits.max_uncompressed_bytes,
        max_compression_ratio=region.limits.max_compression_ratio,
        ratio_check_after_bytes=region.limits.ratio_check_after_bytes,
    )
    keys = None
    if region.pgp is not None:
        client_keys = {
            cid: (c.pgp_public_key, c.pgp_fingerprint)
            for cid, c in clients.items()
            if c.pgp_public_key is not None and c.pgp_fingerprint is not None
        }
        keys = GpgKeyStore.open(region.pgp, data_dir, client_keys)
    processor = BatchProcessor(
        region_id=region_id, clients=clients, limits=limits, store=store,
        renderer_for=renderer_for, clock=utc_now, work_root=data_dir / "work",
        subscribers=subscribers, crypto=keys,
    )
    return Region(region_id, region, data_dir, store, processor, keys)
