"""Retention: results in Downloads and sent mail older than the project keeps them go."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from purlgate.app import build_gateway
from purlgate.config import parse_config
from purlgate.passwords import hash_password
from tests.config_builder import region_toml

CONFIG = region_toml(data_dir="{data}", sftp={"port": 0}) + """[clients.acme]
name = "Acme"
regions = ["usa"]
[clients.acme.sftp]
username = "acme"
password_hash = "{hash}"
[clients.acme.projects.spring]
retention_days = 30
[clients.acme.projects.short]
retention_days = 2
"""


def test_sweep_deletes_only_what_is_past_retention(tmp_path: Path) -> None:
    """A 3-day-old result goes in a 2-day project and stays in a 30-day one; files being
    written (hidden) stay; sent mail older than the longest retention goes; the sweep
    says how many, and a second sweep finds nothing."""
    config = parse_config(CONFIG.format(data=tmp_path / "usa", hash=hash_password("pw")))
    gateway = build_gateway(config, "usa")
    service = gateway.sftp_service
    assert service is not None
    for client_id, client in config.clients.items():
        service.ensure_home(client_id, client)
    old = time.time() - 3 * 86400
    short, spring = service.downloads("acme", "short"), service.downloads("acme", "spring")
    for folder in (short, spring):
        for name in ("PURL_a.csv", "PURL_a.csv.flg", ".PURL_b.csv.part"):
            (folder / name).write_text("x")
            os.utime(folder / name, (old, old))
        (folder / "PURL_new.csv").write_text("x")
    sent = gateway.outbox.sent
    for item, age_days in (("reply-old", 31), ("reply-new", 1)):
        (sent / f"{item}.eml").write_text("x")
        (sent / f"{item}.json").write_text(json.dumps(
            {"delivered_at": time.time() - age_days * 86400, "created_at": 0}))
    assert gateway.retention.sweep() == (2, 1)
    assert sorted(p.name for p in short.iterdir()) == [".PURL_b.csv.part", "PURL_new.csv"]
    assert sorted(p.name for p in spring.iterdir()) == [
        ".PURL_b.csv.part", "PURL_a.csv", "PURL_a.csv.flg", "PURL_new.csv"]
    assert sorted(p.name for p in sent.iterdir()) == ["reply-new.eml", "reply-new.json"]
    assert gateway.retention.sweep() == (0, 0)
    gateway.region.close()
