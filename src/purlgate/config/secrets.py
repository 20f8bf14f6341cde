"""Secret references: where a secret lives (an environment variable or a file), never
the secret itself in the configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

from pydantic import model_validator

from purlgate.config.base import Model
from purlgate.errors import ConfigError


class SecretRef(Model):
    """Where a secret lives: an environment variable or a file, never the config itself."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def reveal(self) -> bytes:
        """Read the secret now; a missing one is a ConfigError naming where it was sought."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"secret not set: {self.describe()}")
            return value.encode()
        assert self.file is not None
        try:
            data = self.file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"secret unreadable: {self.describe()}: {exc.strerror}") from exc
        # Files written by `echo` end in a newline that is not part of the secret.
        return data.rstrip(b"\r\n")
