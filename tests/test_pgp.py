"""PGP with the real gpg: decrypt what clients send, encrypt what we return.

Keys are generated once per session (ed25519/cv25519). Clients are played by their
own GNUPGHOMEs; the gateway's keyring is built by GpgKeyStore.open from the config,
as in production.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from purlgate.channels.defender import Defender
from purlgate.channels.sftp import SftpService, SftpSpool, SftpWorker
from purlgate.config import DefenderConfig, SftpConfig, parse_config
from purlgate.core.archive import aes_zip
from purlgate.core.crypto import looks_like_pgp, spaced_fingerprint
from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import BatchOutcome, Submission
from purlgate.errors import ConfigError, ServerError
from purlgate.pgp import GpgKeyStore
from purlgate.region import build_region
from tests.config_builder import own, region_toml
from tests.conftest import parse_csv, scratch_data_left

T = "20261127_101500"
CSV = "first_name,email,city\nJosé,jose@x.example,\"Paris, FR\"\nZoë,zoe@x.example,Oslo\n"
OUR_PASSPHRASE = "correct horse battery staple"
GPG = shutil.which("gpg")


def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    assert GPG, "the gpg binary is needed (the test bootstrap installs gnupg)"
    result = subprocess.run(
        [GPG, "--homedir", str(home), "--batch", "--yes", "--pinentry-mode", "loopback",
         "--passphrase", "", *args],
        input=input, capture_output=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def new_key(home: Path, uid: str, *, passphrase: str = "", expire: str = "never") -> str:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    base = [GPG, "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
            "--passphrase", passphrase]
    made = subprocess.run([*base, "--quick-gen-key", uid, "ed25519", "sign,cert", expire],
                          check=False, capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr.decode()
    colons = subprocess.run([GPG, "--homedir", str(home), "--with-colons",
                             "--list-secret-keys", uid],
                            check=True, capture_output=True, text=True).stdout
    fpr = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr"))
    added = subprocess.run([*base, "--quick-add-key", fpr, "cv25519", "encr", expire],
                           check=False, capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr.decode()
    return fpr


@dataclass
class Party:
    home: Path
    fpr: str
    pub: Path  # exported public key file


@dataclass
class Keys:
    ours: Party
    secret_file: Path
    acme: Party
    globex: Party
    stranger: Party  # a key no one configured
    expired: Party
    revoked: Party
    expired_message: bytes  # signed while the key was valid, encrypted to us
    revoked_message: bytes  # signed before the revocation, encrypted to us


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    root = tmp_path_factory.mktemp("gpg")

    def party(name: str, **kw: str) -> Party:
        home = root / name
        fpr = new_key(home, f"{name} <{name}@example.test>", **kw)
        pub = root / f"{name}.asc"
        pub.write_bytes(gpg(home, "--armor", "--export", fpr))
        return Party(home, fpr, pub)

    ours = party("ours", passphrase=OUR_PASSPHRASE)
    secret_file = root / "ours-secret.asc"
    secret_file.write_bytes(subprocess.run(
        [GPG, "--homedir", str(ours.home), "--batch", "--pinentry-mode", "loopback",
         "--passphrase", OUR_PASSPHRASE, "--armor", "--export-secret-keys", ours.fpr],
        check=True, capture_output=True).stdout)
    # A key that lives five seconds: sign with it now, and it has expired for real by
    # the time the tests use the message.
    expired = party("expired", expire="seconds=5")
    expires_at = time.monotonic() + 6
    gpg(expired.home, "--import", str(ours.pub))
    expired_message = gpg(expired.home, "--trust-model", "always", "--recipient", ours.fpr,
                          "--local-user", expired.fpr, "--sign", "--encrypt",
                          input=CSV.encode())
    acme, globex, stranger = party("acme"), party("globex"), party("stranger")
    revoked = party("revoked")
    for p in (acme, globex, stranger, revoked):
        gpg(p.home, "--import", str(ours.pub))
    gpg(acme.home, "--import", str(globex.pub))
    revoked_message = gpg(revoked.home, "--trust-model", "always", "--recipient", ours.fpr,
                          "--local-user", revoked.fpr, "--sign", "--encrypt",
                          input=CSV.encode())
    # gpg wrote a revocation certificate at key creation; arm and import it.
    cert = (revoked.home / "openpgp-revocs.d" / f"{revoked.fpr}.rev").read_text()
    gpg(revoked.home, "--import", input=cert.replace(":-----BEGIN", "-----BEGIN").encode())
    revoked.pub.write_bytes(gpg(revoked.home, "--armor", "--export", revoked.fpr))
    time.sleep(max(0.0, expires_at - time.monotonic()))
    yield Keys(ours, secret_file, acme, globex, stranger, expired, revoked, expired_message,
               revoked_message)
    for p in (ours, acme, globex, stranger, expired, revoked):
        subprocess.run(["gpgconf", "--homedir", str(p.home), "--kill", "gpg-agent"],
                       check=False, capture_output=True)


def config_text(k: Keys) -> str:
    return region_toml(relay={"operator": "ops@idomoo.example"},
                       pgp={"fingerprint": k.ours.fpr, "private_key": {"file": str(k.secret_file)},
                            "passphrase": {"env": "PG_TEST_OUR_PASSPHRASE"}}) + f"""[clients.acme]
name = "Acme"
regions = ["usa"]
pgp_public_key = "{k.acme.pub}"
pgp_fingerprint = "{k.acme.fpr}"
[clients.acme.projects.secure]
pgp_encrypt_output = true
pgp_require_signature = true
[clients.acme.projects.plain]

[clients.globex]
name = "Globex"
regions = ["usa"]
pgp_public_key = "{k.globex.pub}"
pgp_fingerprint = "{k.globex.fpr}"
[clients.globex.projects.main]

[clients.oldco]
name = "Old Co"
regions = ["usa"]
pgp_public_key = "{k.expired.pub}"
pgp_fingerprint = "{k.expired.fpr}"
[clients.oldco.projects.main]
pgp_require_signature = true
[clients.oldco.projects.enc]
pgp_encrypt_output = true

[clients.revco]
name = "Rev Co"
regions = ["usa"]
pgp_public_key = "{k.revoked.pub}"
pgp_fingerprint = "{k.revoked.fpr}"
[clients.revco.projects.main]
pgp_require_signature = true
"""


@dataclass
class Gateway:
    tmp: Path
    out: Path
    region: object

    def send(self, data: bytes, name: str, *, client: str = "acme",
             project: str = "secure") -> BatchOutcome:
        path = self.tmp / "in" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return self.region.processor.process(  # type: ignore[attr-defined]
            Submission(path=path, received_name=name, channel="test", client_id=client,
                       project_id=project), self.out)


@pytest.fixture
def gateway(keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("PG_TEST_OUR_PASSPHRASE", OUR_PASSPHRASE)
    region = build_region(parse_config(config_text(keys)), "usa", data_dir=tmp_path / "state")
    out = tmp_path / "out"
    out.mkdir()
    yield Gateway(tmp_path, out, region)
    region.close()


def encrypt(k: Keys, sender: Party, data: bytes, *, sign: Party | None = None,
            armor: bool = False, to: str | None = None, extra: tuple[str, ...] = ()) -> bytes:
    args = ["--trust-model", "always", "--recipient", to or k.ours.fpr]
    if armor:
        args.append("--armor")
    if sign is not None:
        args += ["--local-user", sign.fpr, "--sign"]
    return gpg(sender.home, *args, *extra, "--encrypt", input=data)


def decrypt_as(party: Party, path: Path) -> bytes:
    return gpg(party.home, "--decrypt", str(path))


def outputs(g: Gateway) -> list[str]:
    return sorted(p.name for p in g.out.iterdir())


@pytest.mark.parametrize("armor", [True, False], ids=["armored", "binary"])
def test_signed_file_round_trip(keys: Keys, gateway: Gateway, armor: bool) -> None:
    """Decrypted, checked, processed; the PURL file decrypts with acme's key to the plain PURL."""
    name = f"acme_secure_{T}_00.csv.pgp"
    outcome = gateway.send(encrypt(keys, keys.acme, CSV.encode(), sign=keys.acme, armor=armor),
                           name)
    assert outcome.state is BatchState.DONE, outcome.batch.reason
    assert outcome.batch.data_name == f"acme_secure_{T}_00.csv"
    assert outputs(gateway) == [f"PURL_acme_secure_{T}_00.csv.gpg",
                                f"PURL_acme_secure_{T}_00.csv.gpg.flg"]
    assert outcome.purl is not None
    assert looks_like_pgp(outcome.purl, "x")
    rows = parse_csv(decrypt_as(keys.acme, outcome.purl).decode())
    assert rows[0] == ["first_name", "email", "city", "thumbnail_1", "landingPage"]
    assert [r[:3] for r in rows[1:]] == [["José", "jose@x.example", "Paris, FR"],
                                         ["Zoë", "zoe@x.example", "Oslo"]]
    assert all(r[3].startswith("https://purl.test/t/") for r in rows[1:])
    # Same content sent in plain to a plain project: identical but for the tokens.
    plain = gateway.send(CSV.encode(), f"acme_plain_{T}_00.csv", project="plain")
    plain_rows = parse_csv(plain.purl.read_text())  # type: ignore[union-attr]
    assert [r[:3] for r in plain_rows] == [r[:3] for r in rows]
    assert not any(p.name.startswith(".") for p in gateway.out.iterdir())


def test_guide_example_name(keys: Keys, gateway: Gateway) -> None:
    """data_file.pgp comes back as PURL_data_file.gpg (here with a time of day in the name)."""
    outcome = gateway.send(encrypt(keys, keys.acme, CSV.encode(), sign=keys.acme),
                           f"data_file_{T}.pgp")
    assert outcome.state is BatchState.DONE, outcome.batch.reason
    assert outputs(gateway) == [f"PURL_data_file_{T}.gpg", f"PURL_data_file_{T}.gpg.flg"]
    # The audit trail: the key that signed it, and the PURL file as delivered (encrypted).
    assert outcome.batch.signer == keys.acme.fpr
    assert outcome.batch.purl_sha256 == hashlib.sha256(
        (gateway.out / f"PURL_data_file_{T}.gpg").read_bytes()).hexdigest()


def test_pgp_recognised_by_content(keys: Keys, gateway: Gateway) -> None:
    """An encrypted file named .csv is decrypted anyway: a wrong extension is not a trap."""
    outcome = gateway.send(encrypt(keys, keys.acme, CSV.encode(), sign=keys.acme),
                           f"acme_secure_{T}_01.csv")
    assert outcome.state is BatchState.DONE, outcome.batch.reason
    assert outcome.batch.counts.rows_ok == 2


def test_pgp_holding_a_zip(keys: Keys, gateway: Gateway) -> None:
    """PGP around a ZIP: decrypted, then unwrapped, then parsed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"inner_{T}.csv", CSV)
    outcome = gateway.send(encrypt(keys, keys.acme, buf.getvalue(), sign=keys.acme),
                           f"bundle_{T}.zip.gpg")
    assert outcome.state is BatchState.DONE, outcome.batch.reason
    assert outcome.batch.data_name == f"inner_{T}.csv"


def assert_refused(g: Gateway, outcome: BatchOutcome, reason: str) -> None:
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "pgp"
    assert outcome.batch.reason == reason
    assert outcome.batch.data_name is None, "a refused file must not claim the name"
    assert outputs(g) == []
    assert scratch_data_left(own(g.tmp / "state" / "work")) == [], "decrypted data left behind"


def test_wrong_recipient(keys: Keys, gateway: Gateway) -> None:
    """Encrypted to another key than ours: a plain message naming our fingerprint."""
    data = encrypt(keys, keys.acme, CSV.encode(), sign=keys.acme, to=keys.globex.fpr)
    spaced = " ".join(keys.ours.fpr[i:i + 4] for i in range(0, 40, 4))
    assert_refused(gateway, gateway.send(data, f"a_{T}.csv.pgp"),
                   "the file is not encrypted to our key; encrypt it to the public key we "
                   f"gave you (fingerprint {spaced})")


def test_corrupt_data(keys: Keys, gateway: Gateway) -> None:
    """A damaged message is refused without gpg's own words."""
    data = bytearray(encrypt(keys, keys.acme, CSV.encode() * 50, sign=keys.acme))
    data[len(data) // 2] ^= 0xFF
    assert_refused(gateway, gateway.send(bytes(data), f"a_{T}.csv.pgp"),
                   "the file could not be decrypted: it is damaged or not an OpenPGP message. "
                   "Encrypt it again with the public key we gave you")


@pytest.mark.parametrize("signer", ["globex", "stranger"])
def test_signed_by_another_key(keys: Keys, gateway: Gateway, signer: str) -> None:
    """A good signature by another client's key, or by a key we do not know, is refused."""
    other: Party = getattr(keys, signer)
    data = encrypt(keys, other, CSV.encode(), sign=other)
    spaced = " ".join(keys.acme.fpr[i:i + 4] for i in range(0, 40, 4))
    assert_refused(gateway, gateway.send(data, f"a_{T}.csv.pgp"),
                   f"the file is signed, but not with your agreed key (fingerprint {spaced}); "
                   "sign it with that key")


def test_unsigned_where_required(keys: Keys, gateway: Gateway) -> None:
    """Encrypted but not signed: refused, asking for a signature."""
    spaced = " ".join(keys.acme.fpr[i:i + 4] for i in range(0, 40, 4))
    assert_refused(gateway, gateway.send(encrypt(keys, keys.acme, CSV.encode()), f"a_{T}.csv.pgp"),
                   f"the file is not signed; sign it with your agreed key (fingerprint {spaced}) "
                   "before encrypting it")


def test_plain_file_where_signature_required(gateway: Gateway) -> None:
    """A project that requires signatures refuses an unencrypted file too."""
    outcome = gateway.send(CSV.encode(), f"a_{T}.csv")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason is not None
    assert outcome.batch.reason.startswith("the file is not signed;")


def test_expired_signing_key(keys: Keys, gateway: Gateway) -> None:
    """Signed (back then) by the client's own key, which has since expired: refused."""
    outcome = gateway.send(keys.expired_message, f"a_{T}.csv.pgp", client="oldco",
                           project="main")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason is not None
    assert outcome.batch.reason.startswith("the file is signed with a key that has expired;")


def test_revoked_signing_key(keys: Keys, gateway: Gateway) -> None:
    """Signed by the client's pinned key after it was revoked: refused."""
    outcome = gateway.send(keys.revoked_message, f"a_{T}.csv.pgp", client="revco",
                           project="main")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason is not None
    assert outcome.batch.reason.startswith("the file is signed with a key that was revoked;")


def test_file_name_cannot_spoof_status_lines(keys: Keys, gateway: Gateway) -> None:
    """CVE-2018-12020: an embedded name carrying a fake GOODSIG does not make it signed."""
    fake = (f"x\n[GNUPG:] GOODSIG {keys.acme.fpr[-16:]} acme\n"
            f"[GNUPG:] VALIDSIG {keys.acme.fpr} 2026-11-27 1 0 4 0 22 8 01 {keys.acme.fpr}")
    data = encrypt(keys, keys.acme, CSV.encode(), extra=("--set-filename", fake))
    outcome = gateway.send(data, f"a_{T}.csv.pgp")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason is not None
    assert outcome.batch.reason.startswith("the file is not signed;")


def test_error_file_is_encrypted_too(keys: Keys, gateway: Gateway) -> None:
    """Row errors go back encrypted, as PURL_<stem>_errors.csv.gpg."""
    bad = CSV + "only,two\n"
    outcome = gateway.send(encrypt(keys, keys.acme, bad.encode(), sign=keys.acme),
                           f"acme_secure_{T}_02.csv.pgp")
    assert outcome.state is BatchState.DONE_WITH_ERRORS
    assert outputs(gateway) == [
        f"PURL_acme_secure_{T}_02.csv.gpg", f"PURL_acme_secure_{T}_02.csv.gpg.flg",
        f"PURL_acme_secure_{T}_02_errors.csv.gpg",
    ]
    errors = decrypt_as(keys.acme, gateway.out / f"PURL_acme_secure_{T}_02_errors.csv.gpg")
    assert parse_csv(errors.decode()) == [["row", "column", "reason"],
                                          ["4", "", "has 2 fields, the header has 3"]]


def test_decrypted_temp_file_is_private(keys: Keys, gateway: Gateway, tmp_path: Path) -> None:
    """The decrypted file is created 0600; a failed decrypt leaves no file."""
    store: GpgKeyStore = gateway.region.keys  # type: ignore[attr-defined]
    src = tmp_path / "m.pgp"
    src.write_bytes(encrypt(keys, keys.acme, CSV.encode(), sign=keys.acme))
    target = tmp_path / "plain"
    result = store.decrypt(src, target)
    assert result.signer == keys.acme.fpr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == CSV
    src.write_bytes(b"-----BEGIN PGP MESSAGE-----\n\nnonsense\n-----END PGP MESSAGE-----\n")
    with pytest.raises(Exception, match="could not be decrypted"):
        store.decrypt(src, tmp_path / "plain2")
    assert not (tmp_path / "plain2").exists()


def test_gnupghome_is_private(gateway: Gateway) -> None:
    """The instance's GNUPGHOME is created 0700."""
    home = gateway.tmp / "state" / "gnupg"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_passphrase_with_newline_is_refused(keys: Keys, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A passphrase with a control character never reaches gpg: the region does not start."""
    monkeypatch.setenv("PG_TEST_OUR_PASSPHRASE", "line one\nline two")
    with pytest.raises(ConfigError) as err:
        build_region(parse_config(config_text(keys)), "usa", data_dir=tmp_path / "s")
    assert err.value.message == (
        "the PGP passphrase contains a newline or another control character")


def test_key_file_must_hold_the_pinned_key(keys: Keys, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A client key file with another key than the pinned fingerprint stops the region."""
    monkeypatch.setenv("PG_TEST_OUR_PASSPHRASE", OUR_PASSPHRASE)
    text = config_text(keys).replace(f'pgp_public_key = "{keys.acme.pub}"',
                                     f'pgp_public_key = "{keys.globex.pub}"')
    with pytest.raises(ConfigError) as err:
        build_region(parse_config(text), "usa", data_dir=tmp_path / "s")
    assert err.value.message.startswith(f"client acme: pgp_public_key {keys.globex.pub} must "
                                        f"hold exactly the key {keys.acme.fpr}")


NO_PGP_CONFIG = region_toml() + """[clients.acme]
name = "Acme"
regions = ["usa"]
[clients.acme.projects.plain]
"""


def test_pgp_not_set_up_for_the_region(keys: Keys, tmp_path: Path) -> None:
    """Without a region key pair an encrypted file is refused with what to do."""
    region = build_region(parse_config(NO_PGP_CONFIG), "usa", data_dir=tmp_path / "s")
    g = Gateway(tmp_path, tmp_path / "out", region)
    g.out.mkdir()
    outcome = g.send(encrypt(keys, keys.acme, CSV.encode()), f"a_{T}.csv.pgp", project="plain")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.reason == (
        "encrypted files are not set up for this region; send the file without PGP "
        "encryption, or ask us to set up PGP for you")


def test_gpg_timeout_kills_and_reports(keys: Keys, gateway: Gateway, tmp_path: Path) -> None:
    """An operation past the deadline is killed and reported as our failure, not the client's."""
    store: GpgKeyStore = gateway.region.keys  # type: ignore[attr-defined]
    store._timeout = 0.001
    src = tmp_path / "big.pgp"
    src.write_bytes(encrypt(keys, keys.acme, os.urandom(4_000_000).hex().encode()))
    with pytest.raises(Exception, match="longer than"):
        store.decrypt(src, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_check_config_refuses_control_characters(keys: Keys, tmp_path: Path) -> None:
    """`purlgate check-config` names the region and field of a passphrase with a newline."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(config_text(keys))
    exe = Path(sys.executable).with_name("purlgate")
    result = subprocess.run(
        [str(exe), "check-config", "--config", str(cfg)], capture_output=True, text=True,
        env={**os.environ, "PG_TEST_OUR_PASSPHRASE": "one\ntwo"}, check=False, timeout=60,
    )
    assert result.returncode == 2
    assert ("region usa, field pgp.passphrase: the PGP passphrase contains a newline or "
            "another control character") in result.stderr
    assert "two" not in result.stderr, "the secret must not be echoed"


def test_gpg_armor_default_asc_name(keys: Keys, gateway: Gateway, tmp_path: Path) -> None:
    """What `gpg -a -e -s -r <ours> file.csv` makes with its defaults, file.csv.asc, is
    decrypted and processed; the PURL file comes back as PURL_file.csv.gpg."""
    source = tmp_path / f"acme_secure_{T}_05.csv"
    source.write_text(CSV)
    gpg(keys.acme.home, "--trust-model", "always", "-a", "-e", "-s", "--local-user",
        keys.acme.fpr, "-r", keys.ours.fpr, str(source))
    asc = source.with_name(source.name + ".asc")
    assert asc.read_bytes().startswith(b"-----BEGIN PGP MESSAGE-----")
    outcome = gateway.send(asc.read_bytes(), asc.name)
    assert outcome.state is BatchState.DONE, outcome.batch.reason
    assert outcome.batch.data_name == source.name
    assert outputs(gateway) == [f"PURL_{source.name}.gpg", f"PURL_{source.name}.gpg.flg"]


@pytest.mark.parametrize("name", [f"acme_secure_{T}_06.csv.asc", f"acme_secure_{T}_06.csv"])
def test_clearsigned_file_is_refused_not_processed(keys: Keys, gateway: Gateway,
                                                   tmp_path: Path, name: str) -> None:
    """A clearsigned CSV (gpg --clearsign), whatever its name, is refused with what to
    send instead; no PURL file with armor lines, and the name stays free."""
    source = tmp_path / "data.csv"
    source.write_text(CSV)
    signed = gpg(keys.acme.home, "--local-user", keys.acme.fpr, "--clearsign",
                 "--output", "-", str(source))
    assert signed.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    outcome = gateway.send(signed, name)
    assert_refused(gateway, outcome,
                   "the file is clearsigned (signed but not encrypted), which we do not "
                   "accept; encrypt it to our public key (gpg --encrypt --sign), or send the "
                   "plain file in a password-protected ZIP")


def test_an_expired_client_key_fails_the_batch_before_it_runs(keys: Keys,
                                                              gateway: Gateway) -> None:
    """Results to be encrypted to an expired key: the batch fails before any row is
    read (not after the whole file), says why and that operators know, nothing is
    written, and the name stays free."""
    outcome = gateway.send(CSV.encode(), f"oldco_enc_{T}_00.csv", client="oldco",
                           project="enc")
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "pgp-encrypt"
    assert outcome.batch.reason == (
        "we could not encrypt your results to your PGP key on file (it may have expired or "
        "been revoked), so none were delivered; our operators have been alerted and will "
        "contact you about a renewed key")
    assert outcome.batch.data_name is None
    assert [s for s, _ in outcome.batch.history] == [BatchState.INITIALIZING,
                                                     BatchState.FAILED]
    assert outputs(gateway) == []


def test_check_config_opens_every_key_and_dates_it(keys: Keys, tmp_path: Path) -> None:
    """check-config imports and pins every key: an expired and a revoked client key are
    problems naming client and fingerprint (exit 2); a key that expires within 30 days
    is a warning (exit 0)."""
    exe = Path(sys.executable).with_name("purlgate")
    env = {**os.environ, "PG_TEST_OUR_PASSPHRASE": OUR_PASSPHRASE}
    cfg = tmp_path / "r.toml"
    cfg.write_text(config_text(keys))
    bad = subprocess.run([str(exe), "check-config", "--config", str(cfg)], capture_output=True,
                         text=True, env=env, check=False, timeout=120)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert (f"region usa: client oldco's PGP key ({spaced_fingerprint(keys.expired.fpr)}) "
            "expired on ") in bad.stderr
    assert (f"region usa: client revco's PGP key ({spaced_fingerprint(keys.revoked.fpr)}) "
            "is revoked: replace it") in bad.stderr
    soon_home = tmp_path / "soon"
    soon_fpr = new_key(soon_home, "soon <soon@example.test>", expire="10d")
    soon_pub = tmp_path / "soon.asc"
    soon_pub.write_bytes(gpg(soon_home, "--armor", "--export", soon_fpr))
    text = config_text(keys).split("[clients.oldco]")[0] + (
        f'[clients.soon]\nname = "Soon"\nregions = ["usa"]\npgp_public_key = "{soon_pub}"\n'
        f'pgp_fingerprint = "{soon_fpr}"\n[clients.soon.projects.main]\n')
    cfg.write_text(text)
    ok = subprocess.run([str(exe), "check-config", "--config", str(cfg)], capture_output=True,
                        text=True, env=env, check=False, timeout=120)
    subprocess.run(["gpgconf", "--homedir", str(soon_home), "--kill", "gpg-agent"],
                   check=False, capture_output=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    warning = ok.stdout.splitlines()[0]
    assert warning.startswith(f"warning:  region usa: client soon's PGP key "
                              f"({spaced_fingerprint(soon_fpr)}) expires on ")
    assert warning.endswith("day(s): extend it before then")
    assert ok.stdout.splitlines()[-1] == "configuration OK (1 warning(s))"


def test_pgp_around_a_password_zip_with_purlgate_process(keys: Keys, tmp_path: Path) -> None:
    """`purlgate process` of a PGP file holding an AES ZIP opens the ZIP with the
    client's agreed password (it used to be refused for want of it)."""
    zipped = aes_zip({f"acme_secure_{T}_07.csv": CSV}, b"zip-pass-1")
    name = f"acme_secure_{T}_07.zip.pgp"
    (tmp_path / name).write_bytes(encrypt(keys, keys.acme, zipped, sign=keys.acme))
    (tmp_path / "zip-password").write_text("zip-pass-1\n")
    text = config_text(keys).replace(
        '[clients.acme]\nname = "Acme"',
        f'[clients.acme]\nname = "Acme"\nzip_password = {{ file = "{tmp_path / "zip-password"}" }}')
    cfg = tmp_path / "r.toml"
    cfg.write_text(text)
    exe = Path(sys.executable).with_name("purlgate")
    result = subprocess.run([str(exe), "process", name, "--config", str(cfg), "--project",
                             "secure", "--data-dir", "state"], cwd=tmp_path,
                            capture_output=True, text=True, check=False, timeout=120,
                            env={**os.environ, "PG_TEST_OUR_PASSPHRASE": OUR_PASSPHRASE})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status    Done" in result.stdout


def test_sftp_reasons_for_a_pgp_project_are_only_ever_encrypted(keys: Keys, gateway: Gateway,
                                                                tmp_path: Path) -> None:
    """Over SFTP, a PGP project's upload refused before its batch could write an error
    file (here: not signed), and one dead-lettered for a fault on our side, still leave
    the reason in Downloads, but encrypted to the client as the core names it
    (PURL_<stem>_errors.csv.gpg): a PGP client never finds a plaintext result."""
    region = gateway.region
    clients = {"acme": parse_config(config_text(keys)).clients["acme"]}
    service = SftpService(config=SftpConfig(), root=tmp_path / "sftp", clients=clients,
                          store=region.store, spool=SftpSpool(tmp_path / "sftp-spool"),  # type: ignore[attr-defined]
                          defender=Defender(DefenderConfig()))
    downloads = service.downloads("acme", "secure")
    downloads.mkdir(parents=True)
    worker = SftpWorker(service, region.processor)  # type: ignore[attr-defined]
    for name, data in ((f"acme_secure_{T}_20.csv.pgp", encrypt(keys, keys.acme, CSV.encode())),
                       (f"acme_secure_{T}_21.csv", CSV.encode())):
        (tmp_path / name).write_bytes(data)
        upload = service.spool.adopt(tmp_path / name, name,
                                     {"client": "acme", "project": "secure", "name": name})
        if name.endswith(".pgp"):
            worker.handle(upload)
        else:
            worker.dead_letter(upload, ServerError("boom"), 3)
    assert sorted(p.name for p in downloads.iterdir()) == [
        f"PURL_acme_secure_{T}_20_errors.csv.gpg", f"PURL_acme_secure_{T}_21_errors.csv.gpg"]
    refused = parse_csv(decrypt_as(keys.acme, downloads / f"PURL_acme_secure_{T}_20_errors.csv.gpg")
                        .decode())
    assert refused[0] == ["row", "column", "reason"] and "signed" in refused[1][2]
    ours = parse_csv(decrypt_as(keys.acme, downloads / f"PURL_acme_secure_{T}_21_errors.csv.gpg")
                     .decode())
    assert "a fault on our side" in ours[1][2]
