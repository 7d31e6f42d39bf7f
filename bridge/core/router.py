"""Topic filters to handlers: which code a received message goes to.

Every subscription of the bridge, the core's and the plugins', is a route
here, so no part reaches around the core into the MQTT client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from paho.mqtt.matcher import MQTTMatcher

from bridge.core.plugin import Handler, Inbound

log = logging.getLogger("bridge.core.router")


@dataclass(frozen=True, slots=True)
class Route:
    topic_filter: str
    handler: Handler
    qos: int
    shared: bool = False  #: one worker of a group gets each message (requests)


class Router:
    """An ordered list of (topic filter, handler): the first match takes a message."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        # filter -> index of its first route, in a trie: a message is matched in a
        # few dict lookups, not by trying every filter (paho's topic_matches_sub
        # builds a matcher per call, a measurable cost per request).
        self._matcher = MQTTMatcher()  # type: ignore[no-untyped-call]  # paho's matcher is untyped

    def add(self, topic_filter: str, handler: Handler, qos: int = 1, shared: bool = False) -> None:
        try:
            self._matcher[topic_filter]
        except KeyError:
            self._matcher[topic_filter] = len(self.routes)
        self.routes.append(Route(topic_filter, handler, qos, shared))

    def subscriptions(self, group: str = "") -> list[tuple[str, int]]:
        """(filter, qos) for the broker, each filter once.

        In a worker group the shared routes are subscribed as `$share/<group>/<filter>`
        (each message reaches one worker); the others reach every worker.
        """
        seen: dict[str, int] = {}
        for r in self.routes:
            name = f"$share/{group}/{r.topic_filter}" if group and r.shared else r.topic_filter
            seen[name] = max(seen.get(name, 0), r.qos)
        return list(seen.items())

    def shared_subscriptions(self, group: str) -> list[str]:
        """The filters a worker of `group` leaves the group by unsubscribing."""
        if not group:
            return []
        return sorted({f"$share/{group}/{r.topic_filter}" for r in self.routes if r.shared})

    def route(self, msg: Inbound) -> bool:
        """Hand `msg` to the first matching handler; False when none matches.

        A handler that raises is logged: one bad message never stops the others.
        """
        matches: Iterator[int] = self._matcher.iter_match(msg.topic)  # type: ignore[no-untyped-call]  # as above
        first = min(matches, default=None)
        if first is None:
            return False
        r = self.routes[first]
        try:
            r.handler(msg)
        except Exception:
            log.exception("handler for %s failed on %s", r.topic_filter, msg.topic[:200])
        return True
