"""Every topic name of the protocol, under one prefix `P` (docs/protocol.md).

The one place that spells topics: the core, the plugins, the clients and the
tests build them here, and the device library mirrors this file
(`device/picollm/topics.py`). Device topics are `P/D/kind` or `P/D/kind/R`.
"""

from __future__ import annotations


class Topics:
    """The protocol's topic names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._levels = prefix.count("/") + 1
        self.req_filter = self.device_filter("req")
        self.cancel_filter = self.device_filter("cancel")
        self.status = f"{prefix}/bridge/status"
        self.stats = f"{prefix}/bridge/stats"
        self.models = f"{prefix}/bridge/models"  # protocol v2: the models the API offers

    # --- one device ----------------------------------------------------------------------

    def device(self, device: str, kind: str, rid: str | None = None) -> str:
        """`P/D/kind`, or `P/D/kind/R` for a message about request R."""
        base = f"{self.prefix}/{device}/{kind}"
        return base if rid is None else f"{base}/{rid}"

    def req(self, device: str) -> str:
        return self.device(device, "req")

    def cancel(self, device: str) -> str:
        return self.device(device, "cancel")

    def res(self, device: str, request_id: str) -> str:
        return self.device(device, "res", request_id)

    def res_base(self, device: str) -> str:
        """`P/D/res/`: where every reply topic of D starts (v5 response topics too)."""
        return f"{self.prefix}/{device}/res/"

    def res_filter(self, device: str) -> str:
        return self.device(device, "res", "+")

    def state(self, device: str) -> str:
        return self.device(device, "state")

    def event(self, device: str) -> str:
        return self.device(device, "event")

    def ask(self, device: str) -> str:
        return self.device(device, "ask")

    # protocol v2, "Tools"
    def tools(self, device: str) -> str:
        return self.device(device, "tools")

    def tools_ack(self, device: str) -> str:
        return self.device(device, "tools", "ack")

    def presence(self, device: str) -> str:
        """`P/D/status`: a device's own presence (the bridge's is `status`)."""
        return self.device(device, "status")

    def call(self, device: str) -> str:
        return self.device(device, "call")

    def result(self, device: str) -> str:
        return self.device(device, "result")

    def audio(self, device: str, request_id: str) -> str:
        """Speech for request R, bridge -> device (protocol v2, "Voice")."""
        return self.device(device, "audio", request_id)

    def listen(self, device: str, request_id: str) -> str:
        """An utterance for request R, device -> bridge (protocol v2, "Voice")."""
        return self.device(device, "listen", request_id)

    def upload(self, device: str, request_id: str) -> str:
        """`P/D/upload/R`: a picture the device sends in pieces for request R (v2)."""
        return self.device(device, "upload", request_id)

    def image(self, device: str, request_id: str) -> str:
        """`P/D/image/R`: the pieces of the picture generated for request R (v2)."""
        return self.device(device, "image", request_id)

    # --- filters over every device -------------------------------------------------------

    def device_filter(self, kind: str, *, per_request: bool = False) -> str:
        """`P/+/kind` (or `P/+/kind/+`): one kind of topic of every device."""
        return f"{self.prefix}/+/{kind}/+" if per_request else f"{self.prefix}/+/{kind}"

    def parse(self, topic: str) -> tuple[str, str, str | None] | None:
        """Split `P/D/kind` or `P/D/kind/R` into (D, kind, R or None); None when not ours."""
        parts = topic.split("/")
        n = self._levels
        if len(parts) not in (n + 2, n + 3) or "/".join(parts[:n]) != self.prefix:
            return None
        return parts[n], parts[n + 1], parts[n + 2] if len(parts) == n + 3 else None
