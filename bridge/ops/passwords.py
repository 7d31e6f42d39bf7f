"""Mosquitto's password file format, written without the `mosquitto_passwd` binary.

Mosquitto 2 stores `user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

ITERATIONS = 101
_SALT_BYTES = 12


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The `$7$…` hash Mosquitto checks a password against."""
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether `password` matches a `$7$` hash (as Mosquitto would decide)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3])
        expected = base64.b64decode(parts[4])
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def new_password() -> str:
    """A random password a device can keep in its config file."""
    return secrets.token_urlsafe(18)


def password_line(user: str, password: str) -> str:
    """One line of a Mosquitto password file."""
    if not user or ":" in user or "\n" in user:
        raise ValueError(f"invalid MQTT user name {user!r}")
    return f"{user}:{hash_password(password)}\n"


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable and writable by its owner only (0600).

    The file is written beside its final place and renamed, so a reader (a
    reloading Mosquitto) sees the old file or the new one, never half of one.
    """
    write_atomic(path, text, 0o600)


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text` (file mode `mode`) by writing beside it and renaming."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
