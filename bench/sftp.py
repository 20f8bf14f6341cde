"""Benchmark: a 200 MB upload with the OpenSSH sftp client, purlgate vs OpenSSH's server.

    python bench/sftp.py [--mb 200] [--rounds 3]

Same run, same client, same cipher (aes128-gcm@openssh.com), alternating rounds:
1. purlgate's SFTP server (asyncssh), in a child process, with only the listener:
   the upload is fsynced and moved into the spool before the close is answered (the
   durability promise), and not processed further, so only the upload is timed.
2. OpenSSH's own sftp-server under a throwaway sshd on a high port on 127.0.0.1.
Prints both rates (MB/s) and the ratio purlgate/OpenSSH (target >= 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CIPHER = "aes128-gcm@openssh.com"
NAME = "acme_spring_20261127_101500_00.csv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_data(path: Path, mb: int) -> None:
    row = b"Zo\xc3\xab,Tester,user@acme.example,\"Paris, FR\",12.50\n"
    chunk = row * ((1 << 20) // len(row))
    with path.open("wb") as f:
        f.write(b"first_name,last_name,email,city,amount\n")
        for _ in range(mb):
            f.write(chunk)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def client_key(tmp: Path) -> Path:
    key = tmp / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def upload(port: int, user: str, key: Path, local: Path, remote: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["sftp", "-q", "-b", "-", "-P", str(port), "-i", str(key), "-c", CIPHER,
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1"],
        input=f"put {local} {remote}\n", text=True, check=True, capture_output=True,
        timeout=600, env={**os.environ, "SSH_AUTH_SOCK": ""})
    return time.perf_counter() - start


def start_sshd(tmp: Path, key: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        sys.exit("sshd is needed: apt-get install openssh-server (it is not started)")
    port = free_port()
    root = tmp / "sshd"
    root.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(root / "host_key")], check=True)
    shutil.copy(key.with_suffix(".pub"), root / "authorized_keys")
    dest = tmp / "openssh-dest"
    dest.mkdir()
    sftp_server = next(p for p in ("/usr/lib/openssh/sftp-server",
                                   "/usr/libexec/openssh/sftp-server") if Path(p).exists())
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\n"
        f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\n"
        f"Subsystem sftp {sftp_server}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port, dest


async def child_purlgate(port: int, data_dir: Path, pubkey: str) -> None:
    from purlgate.app import build_gateway
    from purlgate.channels.sftp import start_sftp
    from purlgate.config import parse_config

    text = f"""
[regions.usa]
inbound_addresses = ["sftp-usa@idomoo.com"]
data_dir = "{data_dir}"
public_base_url = "https://purl.test"
[regions.usa.sftp]
port = {port}
[clients.acme]
name = "Acme"
regions = ["usa"]
[clients.acme.sftp]
username = "acme"
authorized_keys = ["{pubkey}"]
flat = true
[clients.acme.projects.spring]
"""
    gateway = build_gateway(parse_config(text), "usa", data_dir=data_dir)
    assert gateway.sftp_service is not None and gateway.host_key is not None
    gateway.sftp_service.on_upload = lambda upload: None  # time the upload only
    await start_sftp(gateway.sftp_service, gateway.host_key)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        port, folder, pub = args.child
        asyncio.run(child_purlgate(int(port), Path(folder), Path(pub).read_text().strip()))
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / NAME
        make_data(data, args.mb)
        size_mb = data.stat().st_size / 1e6
        expected = sha256(data)
        key = client_key(tmp)
        sshd, sshd_port, dest = start_sshd(tmp, key)
        ours_port = free_port()
        state = tmp / "purlgate"
        child = subprocess.Popen([sys.executable, __file__, "--child", str(ours_port),
                                  str(state), str(key.with_suffix(".pub"))],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            times: dict[str, list[float]] = {"openssh": [], "purlgate": []}
            for i in range(args.rounds):
                times["openssh"].append(upload(sshd_port, os.environ.get("USER", "root"),
                                               key, data, str(dest / f"r{i}.csv")))
                assert sha256(dest / f"r{i}.csv") == expected, "OpenSSH stored other bytes"
                (dest / f"r{i}.csv").unlink()
                name = NAME.replace("_00.csv", f"_{i:02d}.csv")
                times["purlgate"].append(upload(ours_port, "acme", key, data,
                                                f"/Uploads/{name}"))
                stored = list((state / "sftp-spool" / "incoming").glob(f"*/{name}"))
                assert len(stored) == 1 and sha256(stored[0]) == expected, \
                    "purlgate did not spool exactly the uploaded bytes"
                shutil.rmtree(state / "sftp-spool" / "incoming")
                (state / "sftp-spool" / "incoming").mkdir()
        finally:
            child.terminate()
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
            sshd.terminate()
            sshd.wait(timeout=30)
        rates = {k: [size_mb / t for t in v] for k, v in times.items()}
        openssh, ours = statistics.median(rates["openssh"]), statistics.median(rates["purlgate"])
        print(f"upload of {size_mb:.0f} MB with the OpenSSH sftp client ({CIPHER}), "
              f"median of {args.rounds}:")
        print(f"  OpenSSH sftp-server      {openssh:7.1f} MB/s  "
              f"{[round(r) for r in rates['openssh']]}")
        print(f"  purlgate (asyncssh)      {ours:7.1f} MB/s  "
              f"{[round(r) for r in rates['purlgate']]}  (fsync before the close is answered)")
        print(f"  ratio purlgate/OpenSSH   {ours / openssh:7.2f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
