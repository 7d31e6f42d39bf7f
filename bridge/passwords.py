"""Mosquitto's password file format, written without the `mosquitto_passwd` binary.

Mosquitto 2 stores `user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

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
