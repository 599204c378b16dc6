"""Password hashes for ``metrics.basic_auth``: ``pbkdf2_sha256$<iterations>$<salt>$<hash>``.

Salt and hash are URL-safe base64 without padding. Standard library only, so the
config check, the HTTP endpoint and ``workqd hash-password`` share one format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

ALGORITHM = "pbkdf2_sha256"
# OWASP's current figure for PBKDF2-HMAC-SHA256 (its Password Storage Cheat Sheet).
ITERATIONS = 600_000
MIN_ITERATIONS = 1_000
# Lines made with fewer are still read (refusing them would stop a daemon on
# upgrade) but get a warning at start: OWASP's figure before 2023 was 310,000
# and this project's default was 100,000.
WEAK_ITERATIONS = 100_000
# Each request with a password pays the iterations: a line asking for more than
# this would let a scraper (or a typo) make every request take seconds.
MAX_ITERATIONS = 1_000_000
SALT_BYTES = 16
DIGEST_BYTES = 32  # sha256

_LINE = re.compile(r"pbkdf2_sha256\$([0-9]{1,9})\$([A-Za-z0-9_-]{1,200})\$([A-Za-z0-9_-]{1,200})",
                   re.ASCII)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_hash(line: str) -> tuple[int, bytes, bytes]:
    """(iterations, salt, digest) of a hash line; ValueError says what is wrong."""
    m = _LINE.fullmatch(line) if isinstance(line, str) else None
    if not m:
        raise ValueError("must look like pbkdf2_sha256$<iterations>$<salt>$<hash> "
                         "(made by: workqd hash-password)")
    iterations = int(m.group(1))
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}, "
                         f"got {iterations}")
    try:
        salt, digest = _b64decode(m.group(2)), _b64decode(m.group(3))
    except (binascii.Error, ValueError):
        raise ValueError("salt and hash must be URL-safe base64 without padding") from None
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"the hash must be {DIGEST_BYTES} bytes (sha256), got {len(digest)}")
    return iterations, salt, digest


def weakness(line: str) -> str | None:
    """Why a valid hash line is too cheap to guess against, or None."""
    try:
        iterations = parse_hash(line)[0]
    except ValueError:
        return None
    if iterations >= WEAK_ITERATIONS:
        return None
    return (f"the hash has {iterations} PBKDF2 iterations, fewer than {WEAK_ITERATIONS}: "
            f"make a new one with workqd hash-password ({ITERATIONS})")


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    """A new hash line for ``password`` with a random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{ALGORITHM}${iterations}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(hash_line: str, password: str) -> bool:
    """Whether ``password`` matches ``hash_line``; False (never an exception) for a bad line."""
    try:
        iterations, salt, digest = parse_hash(hash_line)
        candidate = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    except (ValueError, TypeError, AttributeError, UnicodeError):
        return False
    return hmac.compare_digest(candidate, digest)
