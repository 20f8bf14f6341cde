"""The region's SSH host key: made once (0600), never regenerated, written atomically.

Clients pin it on first contact; a new one would make every client's ``sftp`` refuse us,
so a damaged file is an operator's error at start, never silently replaced.
"""

from __future__ import annotations

from pathlib import Path

import asyncssh

from purlgate.core.files import publish_once
from purlgate.errors import ConfigError


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The key in ``path``, or a new ed25519 key written there (private name, fsync,
    link into place: a crash leaves no truncated key, and of instances starting together
    every one takes the key the first published). A file that holds no key is a
    ConfigError naming it."""
    if path.exists():
        try:
            return asyncssh.read_private_key(str(path))
        except (asyncssh.KeyImportError, OSError, ValueError) as exc:
            raise ConfigError(
                f"the SSH host key {path} is damaged or unreadable ({exc}); restore it from "
                "a backup (a new key makes every client warn of a changed host key)") from exc
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Instances starting together on a shared data_dir: one key is published, all use it.
    return asyncssh.import_private_key(publish_once(path, key.export_private_key()))
