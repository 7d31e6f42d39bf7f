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


def acl_text(prefix: str = "llm", source: Path | None = None) -> str:
    """`broker/acl` for another topic prefix."""
    text = (source or BROKER_DIR / "acl").read_text()
    return text if prefix == "llm" else text.replace("llm/", f"{prefix}/")
