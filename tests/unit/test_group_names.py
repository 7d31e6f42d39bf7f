"""Group workers' names and broker users: the rule `--workers`, worker slots and the
leader (taking over a dead worker's session) share."""

from __future__ import annotations

from bridge.core.group import peer_url, worker_name, worker_url

URL = "mqtt://bridge:s3cret@broker:1883"


def test_worker_names_and_users_follow_the_first() -> None:
    assert [worker_name("bridge", i) for i in (1, 2, 10)] == ["bridge", "bridge-2", "bridge-10"]
    assert worker_url(URL, 1, {}) == URL
    assert worker_url(URL, 3, {}) == "mqtt://bridge-3:s3cret@broker:1883"
    assert worker_url(URL, 3, {"BRIDGE_MQTT_URL_3": "mqtt://w3:x@b"}) == "mqtt://w3:x@b"


def test_a_peer_is_reached_with_its_own_user() -> None:
    own = "mqtt://bridge-2:s3cret@broker:1883"
    assert peer_url("bridge-2", own, "bridge", {}) == URL
    assert peer_url("bridge-2", own, "bridge-3", {}) == "mqtt://bridge-3:s3cret@broker:1883"
    assert peer_url("bridge", URL, "bridge-12", {}) == "mqtt://bridge-12:s3cret@broker:1883"
    given = {"BRIDGE_MQTT_URL_3": "mqtt://w3:x@b"}
    assert peer_url("bridge-2", own, "bridge-3", given) == "mqtt://w3:x@b"


def test_no_peer_outside_the_rule() -> None:
    own = "mqtt://bridge-2:s3cret@broker:1883"
    assert peer_url("bridge-2", own, "bridge-2", {}) is None  # itself
    assert peer_url("bridge-2", own, "other-3", {}) is None  # another group's name
    assert peer_url("bridge-2", own, "bridge-x", {}) is None
    # This worker's user is not its name: the others' users cannot be told.
    assert peer_url("bridge-2", "mqtt://svc:pw@broker", "bridge-3", {}) is None
