"""`purlgate process` and `purlgate check-config`, run as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

from purlgate.channels.outbox import Outbox
from purlgate.channels.relay_data import Outgoing
from purlgate.config import RelayConfig
from purlgate.passwords import hash_password, verify_password
from tests.conftest import DATA, read_csv
from tests.mail_helpers import mail_config

DEMO = "acme_spring_20261127_101500_00.csv"
ROOT = Path(__file__).resolve().parents[1]


def purlgate(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("purlgate")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, check=False)


def test_process_demo_with_bundled_defaults(tmp_path: Path) -> None:
    """With no options the demo file becomes a PURL file in ./out (never beside the
    input, which may be a fixture folder); exit 0 and a summary saying where."""
    shutil.copy(DATA / DEMO, tmp_path / DEMO)
    result = purlgate("process", DEMO, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "batch     1 (usa, client acme, project spring)"
    assert lines[1] == "status    Done"
    assert lines[2] == "rows      20 read, 20 in the PURL file, 0 with errors"
    assert lines[3] == f"purl      {tmp_path / 'out' / ('PURL_' + DEMO)}"
    assert lines[4] == f"flag      {tmp_path / 'out' / ('PURL_' + DEMO + '.flg')}"
    assert len(read_csv(tmp_path / "out" / f"PURL_{DEMO}")) == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO, "out", "var"]
    assert (tmp_path / "var" / "usa" / "batches.sqlite3").exists()
    assert result.stderr == ""


def test_process_again_is_a_duplicate_and_exits_1(tmp_path: Path) -> None:
    """Same name twice: the second run fails with the duplicate reason on stderr."""
    shutil.copy(DATA / DEMO, tmp_path / DEMO)
    assert purlgate("process", DEMO, cwd=tmp_path).returncode == 0
    second = purlgate("process", DEMO, cwd=tmp_path)
    assert second.returncode == 1
    assert "status    Failed" in second.stdout
    assert second.stderr.startswith(
        f"purlgate: batch failed: a file named '{DEMO}' was already received for project spring"
    )


def test_process_options(tmp_path: Path) -> None:
    """--client, --project, --out and --data-dir put things where asked."""
    result = purlgate("process", str(DATA / "ragged_20261127_101500.csv"), "--client", "acme",
                      "--project", "spring", "--out", "outdir", "--data-dir", "state",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "status    Done with Errors" in result.stdout
    assert "rows      5 read, 3 in the PURL file, 2 with errors" in result.stdout
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == [
        "PURL_ragged_20261127_101500.csv", "PURL_ragged_20261127_101500.csv.flg",
        "PURL_ragged_20261127_101500_errors.csv",
    ]
    assert (tmp_path / "state" / "batches.sqlite3").exists()
    assert (tmp_path / "state" / "token.key").exists()


def test_process_failed_batch(tmp_path: Path) -> None:
    """A bad file exits 1 with the reason on stderr and leaves no PURL file."""
    result = purlgate("process", str(DATA / "two_files_20261127_101500.zip"), "--client",
                      "acme", "--out", "o", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "purlgate: batch failed: the ZIP holds 2 data files (a_20261127_101500.csv, "
        "b_20261127_101500.csv); send one data file per ZIP"
    )
    assert list((tmp_path / "o").iterdir()) == []


def test_process_unknown_client_name(tmp_path: Path) -> None:
    """A name that says no client, and no --client: a usage error, exit 1."""
    result = purlgate("process", str(DATA / "comma_20261127_101500.csv"), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot tell which client" in result.stderr
    assert "--client" in result.stderr, "the message names the flag that fixes it"


def test_check_config_ok() -> None:
    """The bundled configuration is valid."""
    result = purlgate("check-config", cwd=Path.cwd())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "configuration OK"
    assert "region usa: sftp-usa@idomoo.com; 1 client(s): acme (spring)" in result.stdout


def test_check_config_says_a_retired_setting_does_nothing(tmp_path: Path) -> None:
    """relay.max_inflight_bytes (deliveries stream now) still loads, with a warning that
    says it has no effect; the configuration is otherwise OK."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        '[regions.usa]\ninbound_addresses=["a@b.example"]\ndata_dir="v"\n'
        'public_base_url="https://x.example"\n'
        '[regions.usa.relay]\nmax_inflight_bytes = 67108864\n')
    result = purlgate("check-config", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "warning:  region usa: field relay.max_inflight_bytes has no effect any more: "
        "each delivery streams its message from disk; remove it")
    assert result.stdout.splitlines()[-1] == "configuration OK (1 warning(s))"


def test_check_config_names_the_problem(tmp_path: Path) -> None:
    """Errors exit 2 and name region/client/project/field; a missing secret is named too."""
    bad = tmp_path / "r.toml"
    bad.write_text(
        '[regions.usa]\ninbound_addresses=["a@b.example"]\ndata_dir="v"\n'
        'public_base_url="https://x.example"\n'
        '[clients.acme]\nname="A"\nregions=["usa"]\nzip_password={env="PG_NOPE_UNSET"}\n'
        '[clients.acme.projects.spring]\npurl_prefix="../"\n'
    )
    result = purlgate("check-config", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "client acme, project spring, field purl_prefix: may not contain" in result.stderr
    bad.write_text(bad.read_text().replace('purl_prefix="../"', ""))
    result = purlgate("check-config", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "purlgate: configuration error: 1 problem(s):\n"
        "  client acme, field zip_password: secret not set: environment variable PG_NOPE_UNSET"
    )


def test_hash_password_from_stdin(tmp_path: Path) -> None:
    """`purlgate hash-password` prints a scrypt hash that verifies the password it read."""
    exe = Path(sys.executable).with_name("purlgate")
    result = subprocess.run([str(exe), "hash-password"], input="s3cret pass\n", text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert stored.startswith("scrypt$32768$8$1$")
    assert verify_password("s3cret pass", stored)
    assert not verify_password("s3cret pas", stored)
    assert "s3cret" not in stored


def test_check_config_opens_templates_and_the_render_api_secret(tmp_path: Path) -> None:
    """check-config loads each project's template (a Jinja syntax error is named) and
    reads the render API's password reference."""
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "landing.html").write_text("<h1>{{ page.heading }</h1>")
    (tpl / "template.toml").write_text("")
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        '[regions.usa]\ninbound_addresses=["a@b.example"]\ndata_dir="v"\n'
        'public_base_url="https://x.example"\n'
        '[regions.usa.relay]\noperator="ops@x.example"\n'
        '[regions.usa.storyboard]\nbase_url="https://api.example"\nusername="u"\n'
        'password={env="PG_NOPE_RENDER"}\n'
        '[clients.acme]\nname="A"\nregions=["usa"]\n'
        f'[clients.acme.projects.spring]\nrender.template="{tpl}"\n'
    )
    result = purlgate("check-config", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "purlgate: configuration error: 2 problem(s):"
    assert lines[1] == ("  region usa, field storyboard.password: secret not set: "
                        "environment variable PG_NOPE_RENDER")
    assert lines[2].startswith(f"  client acme, project spring, field render.template: "
                               f"template {tpl}: unexpected '}}'")


def test_help_lists_every_command_in_plain_words(tmp_path: Path) -> None:
    """--help names every command, with no reStructuredText markup."""
    result = purlgate("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("serve", "process", "replay", "check-config", "hash-password"):
        assert f"    {command}" in result.stdout
    assert "``" not in result.stdout


def test_log_options_anywhere_and_json(tmp_path: Path) -> None:
    """-v and --log-format work before or after the command; JSON lines are JSON with
    the batch's words and no row data."""
    shutil.copy(DATA / DEMO, tmp_path / DEMO)
    result = purlgate("process", DEMO, "-v", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    finished = [e for e in entries if "finished" in e["message"]]
    assert len(finished) == 1
    assert finished[0]["level"] == "info"
    assert "client=acme project=spring channel=cli" in finished[0]["message"]
    assert "rows=20 ok=20 errors=0" in finished[0]["message"]
    assert "José" not in result.stderr and "@acme.example" not in result.stderr
    before = purlgate("-v", "process", DEMO, "--out", "o2", "--data-dir", "s2", cwd=tmp_path)
    assert "INFO purlgate.core: batch 1 finished Done" in before.stderr


def test_serve_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    """A port already taken names the config key; a bad --smtp-port is refused by the
    parser; neither prints a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # From the repository, where the bundled demo's secrets are.
        result = purlgate("serve", "--region", "usa", "--smtp-port", str(port),
                          "--data-dir", str(tmp_path / "d"), cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"purlgate: configuration error: cannot listen for mail on 127.0.0.1:{port} "
        "(regions.usa.smtp.port): Address already in use")
    assert "Traceback" not in result.stderr
    bad = purlgate("serve", "--region", "usa", "--smtp-port", "-5", cwd=tmp_path)
    assert bad.returncode == 2
    assert "argument --smtp-port: -5 is not a port number (0 to 65535)" in bad.stderr


def test_serve_reads_every_secret_of_its_region_at_start(tmp_path: Path) -> None:
    """A client's secret that cannot be read stops the start with one line naming the
    reference and where it is (not, later, a client's message dead-lettered). The
    bundled demo's secrets resolve against the working directory: elsewhere they are
    missing."""
    result = purlgate("serve", "--region", "usa", "--data-dir", "d", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "purlgate: configuration error: secret unreadable: file "
        f"{tmp_path / 'fixtures' / 'secrets' / 'acme-zip-password'}: No such file or "
        "directory (client acme, field zip_password); `purlgate check-config` checks them "
        "all")
    assert not (tmp_path / "d").exists()


def test_replay_takes_a_folder_and_says_what_is_missing(tmp_path: Path) -> None:
    missing = purlgate("replay", "nowhere", "--smtp", "127.0.0.1:1", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("purlgate: configuration error: nowhere: no such "
                                      "file or folder")
    (tmp_path / "empty").mkdir()
    empty = purlgate("replay", "empty", "--smtp", "127.0.0.1:1", cwd=tmp_path)
    assert empty.stderr.strip() == "purlgate: configuration error: no .eml files in empty"
    (tmp_path / "mails").mkdir()
    (tmp_path / "mails" / "a.eml").write_bytes(b"From: a@b\r\n\r\nx\r\n")
    unlisted = purlgate("replay", "mails", "--smtp", "127.0.0.1:1", cwd=tmp_path)
    assert unlisted.returncode == 2
    assert "mails/manifest.toml: no such manifest; give the expected outcomes with " \
           "--manifest FILE" in unlisted.stderr
    assert "Traceback" not in unlisted.stderr + empty.stderr + missing.stderr


def test_batches_lists_and_filters(tmp_path: Path) -> None:
    """`purlgate batches` prints what the store holds, newest first, filtered; --json
    gives the batch view's fields; no row data."""
    shutil.copy(DATA / DEMO, tmp_path / DEMO)
    assert purlgate("process", DEMO, cwd=tmp_path).returncode == 0
    assert purlgate("process", DEMO, cwd=tmp_path).returncode == 1  # a duplicate
    table = purlgate("batches", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "CLIENT", "PROJECT", "CHANNEL", "ROWS", "OK",
                                "ERR", "RECEIVED", "(UTC)", "INSTANCE", "FILE"]
    assert lines[1].split()[:3] == ["2", "Failed", "acme"]
    assert lines[2].split()[:8] == ["1", "Done", "acme", "spring", "cli", "20", "20", "0"]
    assert lines[2].split()[-2:] == [socket.gethostname(), DEMO]  # the instance that ran it
    only = purlgate("batches", "--status", "Done", "--json", cwd=tmp_path)
    batches = json.loads(only.stdout)["batches"]
    assert [b["id"] for b in batches] == [1]
    assert "José" not in only.stdout
    # The audit trail: where it came from, what we received and what we made.
    purl = tmp_path / "out" / f"PURL_{DEMO}"
    assert (batches[0]["source"], batches[0]["received_sha256"], batches[0]["purl_sha256"],
            batches[0]["signer"], batches[0]["sender_auth"]) == (
        f"{DEMO} on {socket.gethostname()}",
        hashlib.sha256((DATA / DEMO).read_bytes()).hexdigest(),
        hashlib.sha256(purl.read_bytes()).hexdigest(), None, None)


def test_outbox_and_dead_letters_commands(tmp_path: Path) -> None:
    """`purlgate outbox` lists queued mail; --retry-now makes it due, --drop moves it to
    failed; `purlgate dead-letters` lists that and --requeue sends it again."""
    async def never(message: Outgoing, sender: str, recipients: object) -> None:
        raise AssertionError

    outbox = Outbox(tmp_path / "d" / "outbox", RelayConfig(), sender=never, clock=lambda: 1e9)
    message = EmailMessage()
    message["Subject"] = "x"
    message.set_content("x")
    outbox.enqueue(message, sender="a@b.example", recipients=["c@d.example"], key="reply-one")
    listed = purlgate("outbox", "--data-dir", "d", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "reply-one" in listed.stdout and "c@d.example" in listed.stdout
    assert listed.stdout.splitlines()[-1] == "-- 1 message(s) queued"
    assert purlgate("outbox", "--data-dir", "d", "--retry-now", "reply-one",
                    cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "d/outbox/queue/reply-one.state").read_text())["next_at"] > 1e9
    missing = purlgate("outbox", "--data-dir", "d", "--drop", "nope", cwd=tmp_path)
    assert missing.returncode == 2
    assert "no queued message 'nope'" in missing.stderr
    assert purlgate("outbox", "--data-dir", "d", "--drop", "reply-one",
                    cwd=tmp_path).returncode == 0
    dead = purlgate("dead-letters", "--data-dir", "d", cwd=tmp_path)
    assert "reply-one" in dead.stdout and "dropped by an operator" in dead.stdout
    again = purlgate("dead-letters", "--data-dir", "d", "--requeue", "reply-one", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "d/outbox/queue").iterdir()) == [
        "reply-one.msg", "reply-one.state"]
    assert list((tmp_path / "d/outbox/failed").iterdir()) == []


def test_config_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    """With --config, a relative secret file and data_dir are found beside the config,
    whatever the current directory; an unreadable secret names its reference."""
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "zip-password").write_text("pw\n")
    (conf / "regions.toml").write_text(
        '[regions.usa]\ninbound_addresses=["a@b.example"]\ndata_dir="state"\n'
        'public_base_url="https://x.example"\n'
        '[clients.acme]\nname="A"\nregions=["usa"]\nzip_password={file="zip-password"}\n'
        '[clients.acme.projects.spring]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok = purlgate("check-config", "--config", str(conf / "regions.toml"), cwd=elsewhere)
    assert ok.returncode == 0, ok.stderr
    shutil.copy(DATA / DEMO, elsewhere / DEMO)
    done = purlgate("process", DEMO, "--config", "../etc/regions.toml", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (conf / "state" / "batches.sqlite3").exists()
    (conf / "zip-password").unlink()
    bad = purlgate("check-config", "--config", str(conf / "regions.toml"), cwd=elsewhere)
    assert bad.returncode == 2
    assert f"secret unreadable: file {conf / 'zip-password'}" in bad.stderr


def test_check_config_reads_every_secret(tmp_path: Path) -> None:
    """Every secret reference is read, wherever it is (relay, IMAP, the web's ops
    password): each unreadable one is named by region and field, none echoed."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        '[regions.usa]\ninbound_addresses=["a@b.example"]\ndata_dir="v"\n'
        'public_base_url="https://x.example"\n'
        '[regions.usa.relay]\nusername="u"\npassword={env="PG_NOPE_RELAY"}\n'
        '[regions.usa.imap]\nhost="imap.example"\nuser="u"\n'
        'password={file="no-such-imap-password"}\n'
        '[regions.usa.web]\nops_password={env="PG_NOPE_OPS"}\n')
    result = purlgate("check-config", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[1:] == [
        "  region usa, field relay.password: secret not set: environment variable "
        "PG_NOPE_RELAY",
        f"  region usa, field imap.password: secret unreadable: file "
        f"{tmp_path / 'no-such-imap-password'}: No such file or directory",
        "  region usa, field web.ops_password: secret not set: environment variable "
        "PG_NOPE_OPS"]


def test_a_damaged_ssh_host_key_stops_serve_with_one_line(tmp_path: Path) -> None:
    """A host key file cut short (what a crash mid-write left before the key was written
    atomically) is never taken, nor silently replaced (clients pin it): serve exits 2
    with one line naming the file."""
    data = tmp_path / "d"
    data.mkdir()
    key = data / "ssh_host_ed25519_key"
    key.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    result = purlgate("serve", "--region", "usa", "--smtp-port", "0", "--data-dir", str(data),
                      cwd=ROOT)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"purlgate: configuration error: the SSH host key {key} is "
                           "damaged or unreadable (")
    assert line.endswith("restore it from a backup (a new key makes every client warn of "
                         "a changed host key)")
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl")


def test_json_logs_are_json_from_the_first_line(tmp_path: Path) -> None:
    """With --log-format json every line is JSON: serve's start-up banner too (event
    "ready", its ports as keys), and a batch's lines carry their facts as keys (event,
    batch, client, project, channel, state, rows, errors, seconds, instance), never row
    data."""
    cfg = tmp_path / "regions.toml"
    cfg.write_text(mail_config(9))
    env = {**os.environ, "PG_TEST_ACME_ZIP": "x", "PURLGATE_INSTANCE": "usa-1"}
    exe = str(Path(sys.executable).with_name("purlgate"))
    server = subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg),
                               "--data-dir", str(tmp_path / "d"), "--log-format", "json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        banner = json.loads(server.stdout.readline())
        assert banner["event"] == "ready" and banner["instance"] == "usa-1"
        assert "accepting mail" in banner["message"] and banner["smtp_port"] > 0
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert all(json.loads(line) for line in err.splitlines()), err
    source = tmp_path / "acme_spring_20261127_101500_00.csv"
    source.write_bytes(b"first_name,email\nZo\xc3\xab,z@acme.example\n")
    done = purlgate("process", str(source), "--config", str(cfg), "--data-dir",
                    str(tmp_path / "p"), "--out", str(tmp_path / "out"), "-v",
                    "--log-format", "json", cwd=tmp_path, env=env)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    [finished] = [line for line in lines if line.get("event") == "batch-finished"]
    assert {k: finished[k] for k in ("batch", "client", "project", "channel", "state",
                                     "rows", "errors", "instance")} == {
        "batch": 1, "client": "acme", "project": "spring", "channel": "cli",
        "state": "Done", "rows": 1, "errors": 0, "instance": "usa-1"}
    assert finished["seconds"] >= 0 and "Zoë" not in done.stderr


def test_check_config_checks_the_e2e_password_against_the_account(tmp_path: Path) -> None:
    """An SFTP e2e_password that the account's password_hash does not accept is a
    problem check-config names (e2e would fail its login); the right one is fine."""
    (tmp_path / "pw").write_text("right one\n")
    text = ('[regions.usa]\ninbound_addresses=["a@b.example"]\ndata_dir="v"\n'
            'public_base_url="https://x.example"\n'
            '[clients.acme]\nname="A"\nregions=["usa"]\n'
            '[clients.acme.sftp]\nusername="acme"\npassword_hash="HASH"\n'
            'e2e_password={ file = "pw" }\n[clients.acme.projects.spring]\n')
    cfg = tmp_path / "r.toml"
    cfg.write_text(text.replace("HASH", hash_password("another one")))
    wrong = purlgate("check-config", "--config", str(cfg), cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        "  client acme, field sftp.e2e_password: the account's password_hash does not "
        "accept it")
    cfg.write_text(text.replace("HASH", hash_password("right one")))
    assert purlgate("check-config", "--config", str(cfg), cwd=tmp_path).returncode == 0
