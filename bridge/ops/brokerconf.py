"""Render the project's `broker/` Mosquitto configuration for a given place and port.

The tests, the demo and the benchmark all run Mosquitto with the same files
that `compose.yaml` mounts; only the container paths and ports differ, and
this module is where they are swapped.
"""

from __future__ import annotations

import re
from pathlib import Path

BROKER_DIR = Path(__file__).resolve().parents[2] / "broker"
_CONTAINER_CONFIG = "/mosquitto/config/"
_CONTAINER_DATA = "/mosquitto/data/"
_LISTENER = re.compile(r"^listener\s+(\d+)(\s+\S+)?\s*$")


def render_config(  # noqa: PLR0913  # keyword-only: each part of the config a caller sets
    *,
    config_dir: Path,
    data_dir: Path,
    ports: dict[int, int],
    host: str = "127.0.0.1",
    source: Path | None = None,
    log_file: Path | None = None,
    run_as: str | None = None,
) -> str:
    """The text of `broker/mosquitto.conf` with paths and listeners replaced.

    Args:
        config_dir: where the password, ACL and certificate files are.
        data_dir: the persistence directory.
        ports: listener port in the file -> port to bind; listeners not named
            here are left out with all their options.
        host: the address to bind the listeners to.
        source: the file to render; default `broker/mosquitto.conf`.
        log_file: log there instead of stdout.
        run_as: the user Mosquitto runs as when started as root (it drops to
            `mosquitto` otherwise, which cannot read a private temporary folder).
    """
    text = (source or BROKER_DIR / "mosquitto.conf").read_text()
    out: list[str] = [f"user {run_as}"] if run_as else []
    keep = True
    for raw in text.splitlines():
        line = raw.strip()
        m = _LISTENER.match(line)
        if m:
            port = int(m.group(1))
            keep = port in ports
            if keep:
                out.append(f"listener {ports[port]} {host}")
            continue
        if not keep or not line or line.startswith("#"):
            continue
        line = line.replace(_CONTAINER_CONFIG, f"{config_dir}/").replace(
            _CONTAINER_DATA, f"{data_dir}/"
        )
        if log_file is not None and line.startswith("log_dest"):
            line = f"log_dest file {log_file}"
        out.append(line)
    return "\n".join(out) + "\n"


def acl_text(
    prefix: str = "llm", source: Path | None = None, users: list[str] | tuple[str, ...] = ()
) -> str:
    """`broker/acl` for another topic prefix, with blocks for further service `users`."""
    text = with_extra_users((source or BROKER_DIR / "acl").read_text(), users)
    return text if prefix == "llm" else text.replace("llm/", f"{prefix}/")


# --- further service users: one ACL block each, copied from their kind's ------------

# The broker makes every client id its user name (use_username_as_clientid), so
# two programs sharing a user would replace each other's connection. A second
# bridge worker or dashboard gets a user of its own, named KIND-NAME, whose
# rules are those of the `user KIND` block of broker/acl.
SERVICE_KINDS = ("bridge", "integrations", "automation")
EXTRA_USER = re.compile(r"^(bridge|integrations|automation)-[A-Za-z0-9_\-]{1,40}$")
EXTRA_MARKER = "# --- users added by `llm-bridge broker user add` (do not edit below) ---"


def extra_user_kind(name: str) -> str | None:
    """The kind (`bridge`, `integrations`, `automation`) of a further service user, or None."""
    m = EXTRA_USER.match(name)
    return m.group(1) if m else None


def _kind_rules(text: str, kind: str) -> list[str]:
    """The `topic` lines of the `user KIND` block of an ACL file."""
    rules: list[str] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("user ") or line == EXTRA_MARKER:
            inside = line == f"user {kind}"
        elif inside and line.startswith("topic "):
            rules.append(line)
    if not rules:
        raise ValueError(f"the ACL has no `user {kind}` block")
    return rules


def extra_users_in(text: str) -> list[str]:
    """The users of the generated part of an ACL file (below the marker), in order."""
    if EXTRA_MARKER not in text:
        return []
    tail = text.split(EXTRA_MARKER, 1)[1]
    return [line.split()[1] for line in tail.splitlines() if line.startswith("user ")]


def with_extra_users(text: str, users: list[str] | tuple[str, ...] = ()) -> str:
    """An ACL file's text with one block for each further service user, at its end.

    Each block copies its kind's rules; a rule that keeps the kind's own device
    topics from it (`topic deny P/KIND/#`) is made about the new name. What was
    below the marker before is replaced, so this is safe to run again.
    """
    head = text.split(EXTRA_MARKER, 1)[0].rstrip("\n") + "\n"
    blocks: list[str] = []
    for name in users:
        kind = extra_user_kind(name)
        if kind is None:
            raise ValueError(f"{name!r} is not KIND-NAME with KIND one of {SERVICE_KINDS}")
        lines = [f"user {name}"]
        for rule in _kind_rules(head, kind):
            parts = rule.split()
            if parts[1] == "deny" and parts[2].endswith(f"/{kind}/#"):
                lines.append(f"topic deny {parts[2][: -len(kind) - 2]}{name}/#")
            else:
                lines.append(rule)
        blocks.append("\n".join(lines) + "\n")
    return f"{head}\n{EXTRA_MARKER}\n" + "\n".join(blocks)
