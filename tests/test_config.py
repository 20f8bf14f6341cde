"""regions.toml: bundled defaults load; mistakes are named by region, client, project, field."""

from __future__ import annotations

from pathlib import Path

import pytest

from purlgate.config import SecretRef, load_config, parse_config
from purlgate.errors import ConfigError
from tests.config_builder import region_toml

GOOD_REGION = region_toml()


def test_bundled_defaults() -> None:
    """Regions usa and eur with their addresses; demo client acme/spring keeps all columns."""
    config = load_config(None)
    assert config.regions["usa"].inbound_addresses == ["sftp-usa@idomoo.com"]
    assert config.regions["eur"].inbound_addresses == ["sftp-eur@idomoo.com"]
    spring = config.clients["acme"].projects["spring"]
    assert spring.keep_all_columns and spring.purl_prefix == "PURL_" and spring.purl_suffix == ""
    assert config.regions["usa"].data_dir == Path.cwd() / "var" / "usa"


def test_repository_regions_toml_is_the_bundled_one() -> None:
    """The top-level regions.toml is the file the package ships."""
    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "regions.toml") == load_config(None)


def test_errors_name_where_they_are() -> None:
    """Each problem names its region, client, project and field."""
    text = GOOD_REGION + """
[regions.eur]
inbound_addresses = ["not-an-address"]
data_dir = "var/eur"
public_base_url = "http://plain.example"

[clients.acme]
name = "Acme"
regions = ["usa"]
[clients.acme.projects.spring]
delimiter = ":"
keep_all_columns = false
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="t.toml")
    msg = err.value.message
    assert msg.startswith("t.toml: 3 problem(s):")
    assert "region eur, field inbound_addresses: 'not-an-address' is not an email" in msg
    assert "region eur, field public_base_url: must be an https:// URL" in msg
    assert "client acme, project spring, field delimiter: Input should be ','" in msg


def test_agreed_columns_or_keep_all() -> None:
    """A project must keep all columns or list the agreed ones."""
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD_REGION + "\n[clients.acme]\nname='A'\nregions=['usa']\n"
                     "[clients.acme.projects.spring]\nkeep_all_columns=false\n")
    assert ("client acme, project spring: list the agreed 'columns' or set "
            "keep_all_columns = true") in err.value.message


def test_unknown_keys_are_refused() -> None:
    """A typo is an error, not a silently ignored setting."""
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD_REGION + "\n[clients.acme]\nname='A'\nregions=['usa']\n"
                     "[clients.acme.projects.p]\nprefix='X_'\n")
    assert "client acme, project p, field prefix: Extra inputs are not permitted" in err.value.message


def test_client_in_unknown_region() -> None:
    """Clients must belong to configured regions."""
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD_REGION + "\n[clients.acme]\nname='A'\nregions=['apac']\n"
                     "[clients.acme.projects.p]\n")
    assert "client acme: unknown region(s) apac; known: usa" in err.value.message


def test_secrets_by_reference_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret is an env var or a file; a plain string is refused."""
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD_REGION + "\n[clients.acme]\nname='A'\nregions=['usa']\n"
                     "zip_password='hunter2'\n[clients.acme.projects.p]\n")
    assert "client acme, field zip_password" in err.value.message
    assert "hunter2" not in err.value.message
    monkeypatch.setenv("PG_TEST_PW", "from-env")
    assert SecretRef(env="PG_TEST_PW").reveal() == b"from-env"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert SecretRef(file=f).reveal() == b"from-file"
    with pytest.raises(ConfigError) as missing:
        SecretRef(env="PG_TEST_UNSET_VAR").reveal()
    assert missing.value.message == "secret not set: environment variable PG_TEST_UNSET_VAR"


CLIENT = """
[clients.acme]
name = "Acme"
regions = ["usa"]
[clients.acme.projects.spring]
"""


@pytest.mark.parametrize(("extra", "message"), [
    ('render.backend = "storyboard-api"',
     "project spring, field render: the storyboard-api backend needs a storyboard_id"),
    ('render.backend = "storyboard-api"\nrender.storyboard_id = "1"',
     "client acme, project spring renders with the storyboard-api but region(s) usa have "
     "no [regions.<id>.storyboard] section"),
    ('render.backend = "storyboard-api"\nrender.storyboard_id = "1"\n'
     'render.pregenerate = ["video"]',
     "template, pregenerate and keep_columns belong to the embedded backend"),
    ('render.backend = "storyboard-api"\nrender.storyboard_id = "1"\n'
     'render.keep_columns = ["email"]',
     "template, pregenerate and keep_columns belong to the embedded backend"),
    ("retention_days = 0", "field retention_days: Input should be greater than 0"),
])
def test_render_settings_are_checked(extra: str, message: str) -> None:
    """Render and retention settings that cannot work are refused with where and why."""
    with pytest.raises(ConfigError) as exc:
        parse_config(GOOD_REGION + CLIENT + extra + "\n")
    assert message in exc.value.message


def test_render_api_needs_an_operator_to_alert() -> None:
    """A region with a render API must name relay.operator: a refused credential stops
    batches and the alert has to reach someone."""
    text = GOOD_REGION + """
[regions.usa.storyboard]
base_url = "https://api.example"
username = "u"
password = { env = "X" }
"""
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert "region usa: a storyboard (render API) section needs relay.operator" in \
        exc.value.message
    ok = parse_config(text + '[regions.usa.relay]\noperator = "ops@x.example"\n')
    assert ok.regions["usa"].storyboard is not None


def test_web_tls_settings_are_checked() -> None:
    """A certificate without its key, or both a certificate and self_signed, are refused."""
    for web, message in (('tls_cert = "/c.pem"', "give both tls_cert and tls_key"),
                         ('tls_cert = "/c"\ntls_key = "/k"\nself_signed = true',
                          "self_signed and tls_cert exclude each other")):
        with pytest.raises(ConfigError) as exc:
            parse_config(GOOD_REGION + "[regions.usa.web]\n" + web + "\n")
        assert message in exc.value.message



def test_encrypting_projects_need_an_operator_to_alert() -> None:
    """A project that encrypts results names an operator: a dead client key fails its
    batches with "our operators have been alerted", which must be true."""
    text = GOOD_REGION + CLIENT.replace(
        "[clients.acme.projects.spring]\n",
        '[clients.acme.projects.spring]\npgp_encrypt_output = true\n').replace(
        '[clients.acme]\nname = "Acme"',
        '[clients.acme]\nname = "Acme"\npgp_public_key = "k.asc"\n'
        'pgp_fingerprint = "' + "A" * 40 + '"')
    text = text.replace("[regions.usa]", "[regions.usa]", 1) + (
        '[regions.usa.pgp]\nfingerprint = "' + "B" * 40 + '"\n')
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert ("client acme, project spring encrypts its results but region(s) usa have no "
            "relay.operator") in exc.value.message
    ok = parse_config(text + '[regions.usa.relay]\noperator = "ops@x.example"\n')
    assert ok.clients["acme"].projects["spring"].pgp_encrypt_output
