"""Bearer tokens of the public API: a file of sha256 hashes, re-read when it changes.

The file holds hashes, never tokens (a leaked Secret or backup then admits nobody):

    # name is optional; it is what the logs say instead of the token
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 gateway
    sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752

Tokens are random (`ditserve token new`: 256 bits), so one unsalted SHA-256 is enough: there
is nothing to brute-force. A presented token is hashed and compared with every stored hash
with `hmac.compare_digest` (constant time, no early exit), so timing tells nothing about
which hash, or how much of one, matched. Reference: RFC 6750 (Bearer), OWASP secrets
management ("store a hash of the API key").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ditserve.common.logs import log_event
from ditserve.config import ConfigError

PREFIX = "sha256:"
_LINE = re.compile(r"^sha256:([0-9a-f]{64})(?:\s+(\S+))?$")


def new_token() -> str:
    """A fresh random token (32 bytes, URL-safe base64) that does not start with "-": one in
    64 would, and `--token -abc...` then reads as a missing value to every argparse CLI
    (it failed CI once). Redrawing those costs 0.02 of the 256 bits."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def hash_token(token: str) -> str:
    """The line to store for `token`: 'sha256:HEX'."""
    return PREFIX + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    name: str


def _file_stamp(path: Path) -> tuple[int, int, int]:
    """Changes when the file is rewritten or replaced (a Kubernetes Secret update swaps a
    symlink, which `stat` follows)."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def parse_tokens(text: str, path: str | Path) -> list[_Entry]:
    """The entries of a tokens file; a bad line is named by number, never echoed (it may be
    a token pasted by mistake)."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(f"tokens file {path} line {number}: expected 'sha256:<64 hex "
                             "digits> [name]' (store hashes, not tokens: `ditserve token hash`)")
        entries.append(_Entry(bytes.fromhex(match[1]), match[2] or f"line-{number}"))
    return entries


class TokenFile:
    """The admitted tokens' hashes; `check` re-reads the file when it has changed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._stamp = _file_stamp(self.path)
            self._entries = parse_tokens(self.path.read_text(), self.path)
        except OSError as error:
            raise ConfigError(f"cannot read tokens file {path}: {error.strerror}") from None
        self._failed: tuple[int, int, int] | None = None  # a bad version, logged once
        if not self._entries:
            log_event("no_tokens", level=30, path=str(self.path),
                      message="the tokens file admits no token: every call is refused")

    def check(self, token: str) -> str | None:
        """The name of the entry that admits `token`, or None."""
        self._reload_if_changed()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self._entries:  # every entry, always: no early exit
            if hmac.compare_digest(digest, entry.digest):
                found = entry.name
        return found

    def _reload_if_changed(self) -> None:
        """One `stat` per call; on a bad or missing new file the previous tokens stay (a
        half-written file must not lock everyone out or let anyone in)."""
        stamp = None
        try:
            stamp = _file_stamp(self.path)
            if stamp in (self._stamp, self._failed):
                return
            entries = parse_tokens(self.path.read_text(), self.path)
        except (OSError, ValueError) as error:
            if stamp is not None:
                self._failed = stamp
                log_event("tokens_reload_failed", level=30, path=str(self.path),
                          error=getattr(error, "strerror", None) or str(error))
            return
        self._stamp, self._entries = stamp, entries
        log_event("tokens_reloaded", path=str(self.path), tokens=len(entries))
