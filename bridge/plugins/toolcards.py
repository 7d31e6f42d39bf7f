"""Tool cards (protocol v2): what devices declare, who may use what, and the names the model sees.

Pure data and rules, no I/O: the tools plugin feeds it the retained messages
of `P/D/tools` and `P/D/status` and asks it for a request's tool set. A bad
card is refused with a message that says where it is wrong; it never
affects another device's card.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
SESSION_RE = NAME_RE

# The bounds of a card (docs/protocol.md "Tools"): a device cannot make the
# bridge hold or forward more than this, whatever it publishes.
MAX_CARD_BYTES = 16384
MAX_STATUS_BYTES = 256
MAX_TOOLS = 32
MAX_DESCRIPTION = 1024
MAX_SCHEMA_DEPTH = 8
DEFAULT_TIMEOUT_MS = 5000
MIN_TIMEOUT_MS = 100
MAX_TIMEOUT_MS = 60000
BRIDGE_OWNER = "bridge"

_TOOL_KEYS = frozenset({"name", "description", "parameters", "timeout_ms"})
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class CardError(ValueError):
    """A card (or status) the bridge refuses; the message says where it is wrong."""


@dataclass(frozen=True)
class ToolSpec:
    """One tool: who runs it (`owner`, a device id or `bridge`) and how the model calls it."""

    owner: str
    name: str
    description: str
    parameters: dict[str, Any]
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    @property
    def ref(self) -> str:
        """`owner/name`, the form policy grants use."""
        return f"{self.owner}/{self.name}"


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(payload: bytes) -> Any:
    """JSON from a device: UTF-8, standard numbers only, bounded nesting (raises ValueError)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_not_a_number)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def depth(value: Any, limit: int) -> int:
    """How deeply objects and arrays nest in `value` (a scalar is 0), counting up to `limit`+1."""
    best = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            best = max(best, level)
            if best > limit:
                return best
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level) for child in children)
    return best


def parse_card(owner: str, payload: bytes) -> list[ToolSpec]:  # noqa: PLR0912  # one check a rule of the card
    """A `P/D/tools` payload as the tools it declares, or CardError saying what is wrong.

    The payload is `{"tools":[{"name":…,"description":…,"parameters":{…},"timeout_ms":…}]}`.
    """
    if len(payload) > MAX_CARD_BYTES:
        raise CardError(f"card is {len(payload)} bytes, more than {MAX_CARD_BYTES}")
    try:
        data = loads_strict(payload)
    except ValueError as exc:
        raise CardError(f"card is {exc}") from None
    if not isinstance(data, dict):
        raise CardError("card must be a JSON object")
    extra = sorted(set(data) - {"tools"})
    if extra:
        raise CardError(f"{extra[0]}: unknown field")
    tools = data.get("tools")
    if not isinstance(tools, list):
        raise CardError("tools: must be a list")
    if len(tools) > MAX_TOOLS:
        raise CardError(f"tools: {len(tools)} tools, more than {MAX_TOOLS}")
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise CardError(f"{where}: must be an object")
        extra = sorted(set(tool) - _TOOL_KEYS)
        if extra:
            raise CardError(f"{where}.{extra[0][:64]}: unknown field")
        name = tool.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise CardError(f"{where}.name: must be 1-64 of A-Z a-z 0-9 _ -")
        if name in seen:
            raise CardError(f"{where}.name: {name} is declared twice")
        seen.add(name)
        description = tool.get("description", "")
        if not isinstance(description, str):
            raise CardError(f"{where}.description: must be a string")
        if len(description) > MAX_DESCRIPTION:
            raise CardError(f"{where}.description: longer than {MAX_DESCRIPTION} characters")
        parameters = tool.get("parameters", _EMPTY_PARAMETERS)
        check_parameters(parameters, f"{where}.parameters")
        timeout = tool.get("timeout_ms", DEFAULT_TIMEOUT_MS)
        if (
            not isinstance(timeout, int)
            or isinstance(timeout, bool)
            or not MIN_TIMEOUT_MS <= timeout <= MAX_TIMEOUT_MS
        ):
            raise CardError(
                f"{where}.timeout_ms: must be an integer {MIN_TIMEOUT_MS}-{MAX_TIMEOUT_MS}"
            )
        out.append(ToolSpec(owner, name, description, parameters, timeout))
    return out


def check_parameters(parameters: Any, where: str) -> None:
    """A tool's parameters must be a JSON Schema of an object, nested at most MAX_SCHEMA_DEPTH."""
    if not isinstance(parameters, dict):
        raise CardError(f"{where}: must be a JSON Schema object")
    if parameters.get("type") != "object":
        raise CardError(f'{where}: must have "type": "object"')
    props = parameters.get("properties", {})
    if not isinstance(props, dict):
        raise CardError(f"{where}.properties: must be an object")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise CardError(f"{where}.required: must be a list of strings")
    if depth(parameters, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise CardError(f"{where}: nested deeper than {MAX_SCHEMA_DEPTH} levels")


@dataclass(frozen=True)
class Presence:
    """A device's `P/D/status`: online with the session token of its current connection."""

    online: bool
    session: str | None = None


def parse_status(payload: bytes) -> Presence:
    """`{"online":true,"session":"…"}` or `{"online":false}` (raises CardError)."""
    if len(payload) > MAX_STATUS_BYTES:
        raise CardError(f"status is {len(payload)} bytes, more than {MAX_STATUS_BYTES}")
    try:
        data = loads_strict(payload)
    except ValueError as exc:
        raise CardError(f"status is {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("online"), bool):
        raise CardError('status must be {"online": true|false, "session": …}')
    if not data["online"]:
        return Presence(False)
    session = data.get("session")
    if not isinstance(session, str) or not SESSION_RE.match(session):
        raise CardError("status.session: must be 1-64 of A-Z a-z 0-9 _ -")
    return Presence(True, session)


def grant_matches(grant: str, spec: ToolSpec) -> bool:
    """Whether a policy grant (`owner/name` or `owner/*`) covers a tool."""
    owner, _, name = grant.partition("/")
    return owner == spec.owner and name in ("*", spec.name)


def valid_grant(grant: str) -> bool:
    """`D/NAME` or `D/*`, D a device id or `bridge`."""
    owner, slash, name = grant.partition("/")
    return (
        bool(slash)
        and NAME_RE.match(owner) is not None
        and (name == "*" or NAME_RE.match(name) is not None)
    )


def _hashed_name(spec: ToolSpec) -> str:
    digest = hashlib.blake2b(spec.ref.encode(), digest_size=6).hexdigest()
    return f"{spec.name[:51]}_{digest}"


@dataclass
class ToolSet:
    """The tools one request may use, each under the one name the model sees."""

    by_name: dict[str, ToolSpec] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def definitions(self) -> list[dict[str, Any]]:
        """The `tools` of the upstream body, in the OpenAI shape."""
        return [
            {
                "type": "function",
                "function": {
                    "name": exposed,
                    "description": spec.description,
                    "parameters": spec.parameters,
                },
            }
            for exposed, spec in self.by_name.items()
        ]


def tool_set(device: str, own: list[ToolSpec], others: list[ToolSpec]) -> ToolSet:
    """Name every tool uniquely for the model.

    The asking device's own tools keep their names; bridge tools keep theirs
    unless taken; another device's tool is `OWNER__NAME`. A name that would be
    longer than 64 characters or is taken becomes the tool's name cut short
    plus a hash of `owner/name`, so it is stable from one request to the next.
    """
    out = ToolSet()
    for spec in own:
        out.by_name[spec.name] = spec
    for spec in others:
        if spec.owner == device:
            continue
        name = spec.name if spec.owner == BRIDGE_OWNER else f"{spec.owner}__{spec.name}"
        if len(name) > 64 or name in out.by_name:
            name = _hashed_name(spec)
        n = 1
        while name in out.by_name:  # a hash collision: practically never
            name = f"{_hashed_name(spec)[:60]}_{n}"
            n += 1
        out.by_name[name] = spec
    return out


@dataclass
class Registry:
    """Every device's accepted card and presence, as the retained messages say.

    Memory: at most one card (MAX_CARD_BYTES) per device that holds broker
    credentials, since only device D may write `P/D/tools`.
    """

    cards: dict[str, list[ToolSpec]] = field(default_factory=dict)
    presence: dict[str, Presence] = field(default_factory=dict)

    def set_card(self, device: str, payload: bytes) -> list[ToolSpec] | None:
        """Take a card (an empty payload withdraws it); raises CardError for a bad one,
        which also withdraws the device's earlier card: what it declares now is wrong."""
        if not payload:
            self.cards.pop(device, None)
            return None
        try:
            specs = parse_card(device, payload)
        except CardError:
            self.cards.pop(device, None)
            raise
        self.cards[device] = specs
        return specs

    def set_status(self, device: str, payload: bytes) -> Presence | None:
        """Take a status (an empty payload forgets it); a bad one counts as offline."""
        if not payload:
            self.presence.pop(device, None)
            return None
        try:
            status = parse_status(payload)
        except CardError:
            self.presence[device] = Presence(False)
            raise
        self.presence[device] = status
        return status

    def session(self, device: str) -> str | None:
        """The session token of an online device, None when it is offline or unknown."""
        status = self.presence.get(device)
        return status.session if status is not None and status.online else None

    def granted(self, grants: list[str], bridge_tools: list[ToolSpec]) -> list[ToolSpec]:
        """The tools of other owners that `grants` name, bridge tools first, then by owner."""
        if not grants:
            return []
        out = [s for s in bridge_tools if any(grant_matches(g, s) for g in grants)]
        for owner in sorted(self.cards):
            out.extend(s for s in self.cards[owner] if any(grant_matches(g, s) for g in grants))
        return out

    def tools_for(self, device: str, grants: list[str], bridge_tools: list[ToolSpec]) -> ToolSet:
        """The tool set of a `use_tools` request of `device`."""
        return tool_set(device, self.cards.get(device, []), self.granted(grants, bridge_tools))
