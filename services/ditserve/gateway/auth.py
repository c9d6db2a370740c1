"""Bearer tokens, checked against a file of their sha256 digests.

The file holds no secret: one lowercase sha256 hex digest a line (`printf %s "$TOKEN" |
sha256sum`), `#` starts a comment. A request's token is hashed and compared with every
digest by `hmac.compare_digest`, so the time taken does not tell how much of a guess was
right. The accepted token is forwarded to the coordinator as `authorization: Bearer …`,
where the same token is meant to be checked again (the gateway is not a trust boundary).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from ditserve.common.status import CommandError

DIGEST = re.compile(r"[0-9a-f]{64}")


class TokenCheck:
    """Which bearer tokens may call; no digests means the check is off."""

    def __init__(self, digests: tuple[str, ...] = ()):
        self.digests = digests

    @classmethod
    def from_file(cls, path: str) -> TokenCheck:
        """The digests of `path` ("" for no check); ValueError names a malformed line."""
        if not path:
            return cls()
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise CommandError(f"cannot read tokens file {path}: {error.strerror}") from None
        digests = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip().lower()
            if line and not DIGEST.fullmatch(line):
                raise CommandError(f"{path}:{number}: expected a sha256 hex digest (64 hex "
                                 "digits), not a token or anything else")
            if line:
                digests.append(line)
        if not digests:
            raise CommandError(f"tokens file {path} lists no digest")
        return cls(tuple(digests))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def accepts(self, token: str | None) -> bool:
        """Whether `token` is one of the configured ones (constant time per digest)."""
        if not self.enabled:
            return True
        if not token:
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        # Compare with every digest, without stopping at a match.
        return sum(hmac.compare_digest(digest, d) for d in self.digests) > 0


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
