"""`purlgate e2e`, the 20-row check before a launch, against a live `purlgate serve`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.dovecot import free_port
from tests.serve_helpers import config_text


def e2e(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("purlgate"))
    return subprocess.run([exe, "e2e", "--region", "usa", "--client", "acme", "--project",
                           "spring", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=240, check=False)


def test_e2e_by_email_and_sftp_against_serve(tmp_path: Path) -> None:
    """Both channels pass the whole check (name, 20 rows intact, links answering, flag
    file on SFTP), the check can be run again at once (fresh names), and a wrong SFTP
    password fails it with exit 1 and the reason."""
    smtp, relay, sftp, web = free_port(), free_port(), free_port(), free_port()
    cfg = tmp_path / "regions.toml"
    text = config_text({"2525": smtp, "2526": relay})
    text = text.replace("[regions.usa.sftp]\nhost = \"127.0.0.1\"\nport = 0\n",
                        f"[regions.usa.sftp]\nhost = \"127.0.0.1\"\nport = {sftp}\n")
    text = text.replace('host = "127.0.0.1"\nport = 0\nself_signed = true',
                        f'host = "127.0.0.1"\nport = {web}\nself_signed = true', 1)
    cfg.write_text(text)
    exe = str(Path(sys.executable).with_name("purlgate"))
    server = subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg),
                               "--data-dir", str(tmp_path / "usa")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=tmp_path)
    try:
        assert server.stdout is not None
        assert "accepting mail" in server.stdout.readline()
        common = ["--config", str(cfg), "--links-base", f"https://127.0.0.1:{web}",
                  "--insecure", "--timeout", "60"]
        mail = e2e("--channel", "email", "--capture", f"127.0.0.1:{relay}", *common,
                   cwd=tmp_path)
        assert mail.returncode == 0, mail.stdout + mail.stderr
        lines = mail.stdout.splitlines()
        assert lines[-1] == "e2e passed"
        assert any(line.startswith("PASS  rows") and "20 of 20 rows, values identical" in line
                   for line in lines)
        assert any(line.startswith("PASS  links") and "20 landing pages (200)" in line
                   for line in lines)
        again = e2e("--channel", "email", "--capture", f"127.0.0.1:{relay}", *common,
                    cwd=tmp_path)
        assert again.returncode == 0, again.stdout
        password = ROOT / "fixtures" / "secrets" / "acme-sftp-password"
        by_sftp = e2e("--channel", "sftp", "--sftp-password-file", str(password), *common,
                      cwd=tmp_path)
        assert by_sftp.returncode == 0, by_sftp.stdout + by_sftp.stderr
        assert any(".flg in /Downloads" in line for line in by_sftp.stdout.splitlines())
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password\n")
        bad = e2e("--channel", "sftp", "--sftp-password-file", str(wrong), *common,
                  cwd=tmp_path)
        assert bad.returncode == 1
        assert bad.stdout.splitlines()[-2].startswith("FAIL  login")
        assert bad.stdout.splitlines()[-1] == "e2e FAILED"
    finally:
        server.terminate()
        server.wait(30)
        if server.stdout is not None:
            server.stdout.close()


def test_e2e_needs_no_flag_beyond_client_project_and_channel(tmp_path: Path) -> None:
    """Against serve with the bundled configuration (here on free ports), `purlgate e2e`
    needs only --client, --project and --channel: purl-usa.localhost resolves to the
    loopback address, serve's self-signed certificate is trusted (not ignored), and
    the SFTP login is the account's e2e_password."""
    smtp, relay, sftp, web = free_port(), free_port(), free_port(), free_port()
    text = config_text({"2525": smtp, "2526": relay})
    text = text.replace("[regions.usa.sftp]\nhost = \"127.0.0.1\"\nport = 0\n",
                        f"[regions.usa.sftp]\nhost = \"127.0.0.1\"\nport = {sftp}\n")
    text = text.replace('host = "127.0.0.1"\nport = 0\nself_signed = true',
                        f'host = "127.0.0.1"\nport = {web}\nself_signed = true', 1)
    text = text.replace("https://purl-usa.localhost:8443", f"https://purl-usa.localhost:{web}")
    cfg = tmp_path / "regions.toml"
    cfg.write_text(text)
    exe = str(Path(sys.executable).with_name("purlgate"))
    server = subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=tmp_path)
    try:
        assert server.stdout is not None
        assert "accepting mail" in server.stdout.readline()
        for channel in ("email", "sftp"):
            run = e2e("--channel", channel, "--config", str(cfg), cwd=tmp_path)
            assert run.returncode == 0, run.stdout + run.stderr
            assert run.stdout.splitlines()[-1] == "e2e passed"
            assert any(line.startswith("PASS  links") for line in run.stdout.splitlines())
    finally:
        server.terminate()
        server.wait(30)
        if server.stdout is not None:
            server.stdout.close()
