"""The names and broker users of a worker group's workers.

`llm-bridge run --workers N` and worker slots name the workers `base`,
`base-2`, `base-3`... and give each the broker user of the same name with the
group's password (or `BRIDGE_MQTT_URL_<i>`). The leader needs the same rule
to take over the broker session of a worker that died (docs/scaling.md).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

_NUMBERED = re.compile(r"(.+)-([2-9]|[1-9][0-9]+)")


def worker_name(base: str, index: int) -> str:
    """Worker 1 keeps `base`; the others are `base-2`, `base-3`, ..."""
    return base if index == 1 else f"{base}-{index}"


def worker_url(url: str, index: int, env: dict[str, str]) -> str:
    """Worker `index`'s broker URL: `BRIDGE_MQTT_URL_<index>` when set, else `url` with
    the user `user-<index>` (same password) for the workers after the first."""
    own = env.get(f"BRIDGE_MQTT_URL_{index}")
    if own:
        return own
    parts = urlsplit(url)
    if index == 1 or not parts.username:
        return url
    user = quote(worker_name(unquote(parts.username), index), safe="")
    return _with_user(url, user)


def _with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    auth = f"{user}:{parts.password}@" if parts.password is not None else f"{user}@"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, auth + host, parts.path, parts.query, parts.fragment))


def _split(name: str) -> tuple[str, int]:
    m = _NUMBERED.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else (name, 1)


def peer_url(own_name: str, own_url: str, peer: str, env: dict[str, str]) -> str | None:
    """The broker URL of worker `peer` of this worker's group, or None when the names
    do not follow the group's rule (workers named by hand: their users are unknown)."""
    base, own_index = _split(own_name)
    peer_base, peer_index = _split(peer)
    if peer_base != base or peer_index == own_index:
        return None
    given = env.get(f"BRIDGE_MQTT_URL_{peer_index}")
    if given:
        return given
    parts = urlsplit(own_url)
    if parts.username is None or unquote(parts.username) != own_name:
        return None  # this worker's user is not its name: no rule to follow
    return worker_url(_with_user(own_url, quote(base, safe="")), peer_index, {})
