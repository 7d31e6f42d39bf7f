"""Worker groups (docs/scaling.md): several bridges behind one shared subscription.

Real parts: Mosquitto with broker/'s config (one broker user per worker, as a
broker with `use_username_as_clientid` needs), the mock LLM, each worker a real
`python -m bridge run` process, Redis as Debian's `redis-server`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from bench.procs import TcpProxy, worker_acl
from bridge.core.protocol import SEQ_UNKNOWN
from bridge.core.shared import Guarded, Held, RedisStore, SqliteStore
from tests.harness import (
    API_KEY,
    REPO,
    BridgeProcess,
    Broker,
    Device,
    bridge_env,
    free_port,
    wait_for_status,
    wait_port,
)

WORKERS = ("bridge", "bridge-2", "bridge-3")
_prefixes = itertools.count()
SLOW = "[mock tokens=40 delay_ms=25]"


@pytest.fixture(scope="module")
def group_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("gbroker"))
    acl = b.dir / "acl"
    acl.write_text(worker_acl(acl.read_text(), list(WORKERS[1:])))
    for user in WORKERS[1:]:
        b.add_user(user, f"{user}-pw", reload=False)
    b.start()
    yield b
    b.stop()


class Redis:
    """`redis-server` on a free loopback port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.skip("redis-server is not installed (tests/run.sh installs it)")
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    r = Redis(tmp_path).start()
    yield r
    r.stop()


class Group:
    """Workers of one group on one prefix; `start(i)` (re)starts worker i with its own user."""

    def __init__(
        self,
        broker: Broker,
        base_url: str,
        workdir: Path,
        prefix: str,
        hosts: bool = False,
        **env: Any,
    ) -> None:
        self.broker = broker
        self.hosts = hosts  # each worker its own data folder, as on hosts of its own
        self.prefix = prefix
        self.procs: dict[int, BridgeProcess] = {}
        self.dir = workdir
        self.base_url = base_url
        self.env = env

    def start(self, i: int) -> BridgeProcess:
        user = WORKERS[i]
        env = {"BRIDGE_STATE": "false", "BRIDGE_HA_DISCOVERY": "false", **self.env}
        e = bridge_env(
            self.broker, self.base_url,
            BRIDGE_MQTT_URL=self.broker.url(user), BRIDGE_CLIENT_ID=user,
            BRIDGE_TOPIC_PREFIX=self.prefix, BRIDGE_GROUP="g",
            BRIDGE_DATA_DIR=str(self.dir / (f"data-{user}" if self.hosts else "data")), **env,
        )  # fmt: skip
        proc = BridgeProcess(self.dir / user, e).start()
        self.procs[i] = proc
        return proc

    def wait_subscribed(self, i: int, timeout: float = 15.0) -> None:
        """Until worker i's log says it is connected (its subscriptions follow at once)."""
        deadline = time.monotonic() + timeout
        proc = self.procs[i]
        while "connected to" not in proc.logs():
            assert time.monotonic() < deadline, f"worker {i} did not connect: {proc.logs()[-800:]}"
            time.sleep(0.05)
        time.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
            assert API_KEY not in proc.logs()


@pytest.fixture
def group(group_broker: Broker, mock_llm: Any, tmp_path: Path) -> Iterator[Callable[..., Group]]:
    made: list[Group] = []

    def make(n: int = 3, hosts: bool = False, **env: Any) -> Group:
        g = Group(group_broker, mock_llm.base_url, tmp_path, f"g{next(_prefixes)}", hosts, **env)
        made.append(g)
        for i in range(n):
            g.start(i)
        wait_for_status(group_broker, g.prefix, "online")
        for i in range(n):
            g.wait_subscribed(i)
        return g

    yield make
    for g in made:
        g.stop()


def _served_by(g: Group, rid: str) -> list[int]:
    return [i for i, p in g.procs.items() if f"id={rid} model=" in p.logs()]


def _ask(dev: Device, rid: str, text: str = "hello") -> None:
    dev.send({"id": rid, "messages": [{"role": "user", "content": text}], "stream": True})


def _kill_its_worker(g: Group, dev: Device, rid: str, text: str) -> int:
    """Ask, and kill -9 the worker that streams the reply; its index."""
    _ask(dev, rid, text)
    deadline = time.monotonic() + 10
    while not dev.messages(rid):  # streaming
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (owner,) = _served_by(g, rid)
    g.procs[owner].kill()
    return owner


def _retry_served(dev: Device, rid: str, text: str) -> None:
    """The device library's retry (same id, same payload) is served, not a duplicate."""
    with dev._cond:
        dev.replies[rid].clear()
    _ask(dev, rid, text)
    assert dev.wait(rid, 20).terminal.get("done") is True


# --- the store, in one process -----------------------------------------------------------


def _store_contract(a: Any, b: Any) -> None:
    """Two workers' handles on one store: each decision is the store's, not the handle's."""
    now = time.time()
    assert a.claim("d1", "r1", b"x", now, 600)
    assert not b.claim("d1", "r1", b"x", now, 600), "the second worker sees a duplicate"
    assert b.claim("d1", "r1", b"y", now, 600), "another payload with the same id is new"
    b.forget("d1", "r1", b"x")  # only the claim of that payload: it is not there any more
    assert not a.claim("d1", "r1", b"y", now, 600)
    a.forget("d1", "r1")
    assert b.claim("d1", "r1", b"y", now, 600), "an interrupted request's retry is served"

    assert a.open_stream("d1", "k1", "t1", "w1", 2) == -1
    assert b.open_stream("d1", "k2", "t2", "w2", 2) == -1
    assert a.open_stream("d1", "k3", "t3", "w1", 2) == 2, "the third across workers is refused"
    assert b.open_stream("d1", "k1", "t4", "w2", 2) == -1, "the same id replaces, adds none"
    # The replaced request ends: its successor still counts, and both still run.
    assert a.close_stream("d1", "k1", "t1") == 2
    assert a.open_stream("d1", "k3", "t3", "w1", 2) == 2
    b.drop_worker("w2")  # w2 died: its replacement forgets its streams
    assert a.open_stream("d1", "k3", "t3", "w1", 2) == -1
    assert b.close_stream("d1", "k3", "t3") == 0, "each worker sees the other's"
    assert a.open_stream("d2", "k1", "t5", "w1", 0) == -1, "no limit"

    a.add_request("d1", now)
    b.add_request("d1", now)
    assert len(a.requests_since("d1", now - 60)) == 2
    a.add_tokens("d1", 100, now)
    b.add_tokens("d1", 50, now)
    assert a.tokens("d1", time.strftime("%Y-%m-%d", time.gmtime(now))) == 150

    a.add_counts({"requests": 2, "errors": 1})
    b.add_counts({"requests": 1, "errors": 0})
    assert {k: v for k, v in b.counts().items() if k in ("requests", "errors")} == {
        "requests": 3, "errors": 1}  # fmt: skip

    assert a.lead("w1", 5, now)
    assert not b.lead("w2", 5, now), "one leader at a time"
    assert a.lead("w1", 5, now), "the leader renews"
    a.resign("w1")
    assert b.lead("w2", 5, now), "a resigned leader's place is free"

    assert not a.beat("w1", 5, now), "its first beat"
    assert a.beat("w1", 5, now), "known among the living"
    b.beat("w2", 5, now)
    b.beat("w3", 5, now)
    assert a.silent(now + 1) == []
    b.leave("w3")  # stopped cleanly: nobody takes its place
    a.beat("w1", 5, now + 4)  # w1 goes on beating; w2 stops
    assert a.silent(now + 6) == b.silent(now + 6) == ["w2"]
    assert not a.take_silent("w2", now + 1), "not silent yet"
    assert b.take_silent("w2", now + 6)
    assert not a.take_silent("w2", now + 6), "one worker takes a silent one's place"
    assert a.silent(now + 6) == []
    assert not b.beat("w2", 5, now + 7), "w2 lived: its next beat tells it it was taken"

    a.hold("w1", Held("d1", "r1", "p/d1/res/r1", None))
    a.hold("w1", Held("d2", "r2", "p/d2/res/r2", None))
    a.hold("w1", Held("d3", "r3", "p/d3/res/v5", b"\x00corr"))
    a.unhold("w1", "d2", "r2")  # served: its duplicate record stays
    taken = b.take_holds("w1", now)
    assert sorted(taken) == [("d1", "r1", "p/d1/res/r1", None),
                             ("d3", "r3", "p/d3/res/v5", b"\x00corr")]  # fmt: skip
    assert a.take_holds("w1", now) == [], "taken once"
    a.hold("w1", Held("d4", "r4", "p/d4/res/r4", None))  # w1 came back, and holds one more
    settled = b.settle("w1")
    assert settled.answered == {("d1", "r1"), ("d3", "r3")}, "its journal skips what was answered"
    assert settled.holds == [("d4", "r4", "p/d4/res/r4", None)], "for the settler to answer"
    assert a.take_holds("w1", now) == [], "what its journal answers is nobody else's"
    assert a.settle("w1") == (set(), [])
    a.hold("w1", Held("d5", "r5", "p/d5/res/r5", None))
    assert [h.key for h in b.take_holds("w1", now)] == ["r5"]  # taken for dead while it lived
    assert a.take_answered("w1") == {("d5", "r5")}, "what it must stop, without a terminal"
    assert a.take_answered("w1") == set()

    # `take`: the claim and the hold in one step, or neither.
    assert a.take("w1", Held("d6", "r6", "p/d6/res/r6", b"c"), b"x", now, 600)
    assert not b.take("w2", Held("d6", "r6", "p/d6/res/r6", None), b"x", now, 600), "duplicate"
    assert not b.claim("d6", "r6", b"x", now, 600), "taken is claimed"
    assert b.take_holds("w2", now) == [], "a duplicate is not held"
    assert a.take_holds("w1", now) == [("d6", "r6", "p/d6/res/r6", b"c")]


def test_sqlite_store_is_one_state_for_two_workers(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    _store_contract(SqliteStore(path), SqliteStore(path))


def test_redis_store_is_one_state_for_two_workers(redis_server: Redis) -> None:
    _store_contract(RedisStore(redis_server.url, "t"), RedisStore(redis_server.url, "t"))


def test_sqlite_leader_lease_expires(tmp_path: Path) -> None:
    a, b = SqliteStore(tmp_path / "s"), SqliteStore(tmp_path / "s")
    assert a.lead("w1", 1, 100.0)
    assert not b.lead("w2", 1, 100.5)
    assert b.lead("w2", 1, 101.5), "a leader that stopped renewing is replaced"


def test_guarded_store_serves_from_memory_while_redis_is_down_and_recovers(
    redis_server: Redis,
) -> None:
    g = Guarded(RedisStore(redis_server.url, "t", timeout=0.2), "w1")
    now = time.time()
    assert g.claim("d", "r1", b"x", now, 600)
    redis_server.stop()
    assert not g.claim("d", "r1", b"x", now, 600), "this worker still knows what it took"
    assert g.claim("d", "r2", b"x", now, 600)
    assert g.degraded
    assert g.open_stream("d", "k", "t", "w1", 1) == -1
    assert g.open_stream("d", "k2", "t2", "w1", 1) == 1, "limits hold per worker meanwhile"
    assert not g.lead("w1", 5, now), "no worker leads without the store"
    assert g.beat("w1", 5, now) is None  # nothing to say it with, nothing learnt
    assert g.take_answered("w1") == set()
    assert g.silent(now + 60) == [] and g.take_holds("w2", now) == []
    assert g.settle("w2") is None, "unknown: the journal is answered in full"
    assert not g.take_silent("w2", now + 60), "nobody is taken for dead without the store"
    redis_server.start()
    deadline = time.monotonic() + 5
    while not g.claim("d", f"r{time.monotonic_ns()}", b"x", now, 600) or g.degraded:
        assert time.monotonic() < deadline, "never recovered"
        time.sleep(0.1)
    assert not g.degraded


# --- workers as processes ----------------------------------------------------------------


def test_requests_spread_across_workers_each_answered_once(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    g = group(3)
    dev = Device(group_broker, "spread1", g.prefix)
    try:
        rids = [f"s{i}" for i in range(12)]
        for rid in rids:
            _ask(dev, rid)
        for rid in rids:
            assert dev.wait(rid).terminal.get("done") is True
        owners = {rid: _served_by(g, rid) for rid in rids}
        assert all(len(o) == 1 for o in owners.values()), owners
        assert {o[0] for o in owners.values()} == {0, 1, 2}, owners
        dev.quiet_after(rids[-1])
        for rid in rids:
            Device.wait(dev, rid)  # still exactly one terminal each
    finally:
        dev.close()


def test_cancel_reaches_the_worker_that_holds_the_request(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    g = group(3)
    dev = Device(group_broker, "cancel1", g.prefix)
    try:
        rids = [f"c{i}" for i in range(6)]
        for rid in rids:
            _ask(dev, rid, f"{SLOW} long one")
        deadline = time.monotonic() + 10
        while not all(dev.messages(rid) for rid in rids):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for rid in rids:
            dev.cancel(rid)
        for rid in rids:
            reply = dev.wait(rid)
            assert reply.error_code == "cancelled", reply.terminal
        assert len({_served_by(g, rid)[0] for rid in rids}) > 1
    finally:
        dev.close()


def test_a_devices_stream_limit_holds_across_workers(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    policy = {"default": {"max_streams": 2}}
    g = group(3, BRIDGE_POLICY=json.dumps(policy))
    dev = Device(group_broker, "limit1", g.prefix)
    try:
        rids = [f"l{i}" for i in range(6)]
        for rid in rids:
            _ask(dev, rid, f"{SLOW} long one")
        codes = [dev.wait(rid).error_code for rid in rids]
        assert codes.count(None) == 2, codes
        assert codes.count("too_many_streams") == 4, codes
        assert len({_served_by(g, rid)[0] for rid in rids if _served_by(g, rid)}) > 1
        # Once they finished the device may stream again, on any worker.
        for rid in ("l-after1", "l-after2"):
            _ask(dev, rid)
        assert dev.wait("l-after1").error_code is None
        assert dev.wait("l-after2").error_code is None
    finally:
        dev.close()


def test_duplicate_deliveries_are_served_once_across_workers(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    g = group(3)
    dev = Device(group_broker, "dup1", g.prefix)
    try:
        for _ in range(6):  # the same request six times: three workers see it
            _ask(dev, "same", f"{SLOW} once")
        reply = dev.wait("same")
        assert reply.terminal.get("done") is True
        dev.quiet_after("same", 0.5)
        assert sum(p.logs().count("id=same model=") for p in g.procs.values()) == 1
    finally:
        dev.close()


def test_kill_9_of_a_worker_under_load_loses_no_request(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    """Every request ends with one terminal: served, or `interrupted` and then served on
    its retry (same id and payload), wherever the retry lands. Requests the broker queued
    for the dead worker's session arrive when its replacement connects."""
    g = group(3)
    dev = Device(group_broker, "kill1", g.prefix)
    try:
        rids = [f"k{i}" for i in range(24)]
        payload = {rid: f"{SLOW} request {rid}" for rid in rids}
        for rid in rids[:12]:
            _ask(dev, rid, payload[rid])
        time.sleep(0.4)  # streaming on all three
        g.procs[1].kill()
        for rid in rids[12:]:  # a third of these queue in the dead worker's session
            _ask(dev, rid, payload[rid])
        time.sleep(0.5)
        g.start(1)  # its replacement: same id, same journal
        retried: list[str] = []
        for rid in rids:
            msgs = dev.wait_raw(rid, 20)
            terminal = msgs[-1]
            if terminal.get("error", {}).get("code") == "interrupted":
                retried.append(rid)
                with dev._cond:
                    dev.replies[rid].clear()
                _ask(dev, rid, payload[rid])
        assert retried, "the killed worker held requests: they end interrupted"
        for rid in rids:
            assert dev.wait(rid, 20).terminal.get("done") is True, rid
        time.sleep(0.5)
        for rid in rids:
            dev.quiet_after(rid, 0)  # one terminal each, nothing after it
    finally:
        dev.close()


def test_a_worker_that_stops_leaves_the_group_and_its_share_goes_to_the_others(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    """A scale-down: Mosquitto would keep queueing the stopped worker's share of new
    requests in its session; the worker unsubscribes before it stops, so the others get
    every request at once. Started again (same id), it rejoins and serves its share."""
    g = group(2)
    dev = Device(group_broker, "leave1", g.prefix)
    try:
        g.procs[1].stop()
        assert "left worker group g" in g.procs[1].logs()
        rids = [f"l{i}" for i in range(10)]
        for rid in rids:
            _ask(dev, rid)
        for rid in rids:
            assert dev.wait(rid, 10).terminal.get("done") is True, rid
        assert all(_served_by(g, rid) == [0] for rid in rids)
        connects = g.procs[1].logs().count("connected to")
        g.start(1)
        deadline = time.monotonic() + 15
        while g.procs[1].logs().count("connected to") == connects:  # the new process's
            assert time.monotonic() < deadline, g.procs[1].logs()[-800:]
            time.sleep(0.05)
        time.sleep(0.3)
        more = [f"m{i}" for i in range(10)]
        for rid in more:
            _ask(dev, rid)
        for rid in more:
            assert dev.wait(rid, 10).terminal.get("done") is True, rid
        assert {_served_by(g, rid)[0] for rid in more} == {0, 1}
    finally:
        dev.close()


def test_a_device_served_by_two_workers_is_idle_only_when_both_are_done(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    """Each worker publishes the state of the requests it serves: the one that finishes
    first must not say `idle` while the other still streams for the same device."""
    g = group(2, BRIDGE_STATE="true")
    dev = Device(group_broker, "busy1", g.prefix)
    topic = f"{g.prefix}/busy1/state"
    try:
        _ask(dev, "slow", "[mock tokens=80 delay_ms=25] a long one")
        deadline = time.monotonic() + 10
        while not dev.messages("slow"):  # streaming
            assert time.monotonic() < deadline
            time.sleep(0.05)
        slow_worker = _served_by(g, "slow")
        for i in range(6):  # the broker takes the workers in turn: one lands on the other
            _ask(dev, f"f{i}")
            assert dev.wait(f"f{i}", 10).terminal.get("done") is True
            if _served_by(g, f"f{i}") != slow_worker:
                break
        else:
            pytest.fail("no quick request went to the other worker")
        time.sleep(0.3)
        state = json.loads(_retained(group_broker, topic) or b"{}")
        assert state.get("status") in ("thinking", "streaming"), state
        assert dev.wait("slow", 20).terminal.get("done") is True
        time.sleep(0.3)
        state = json.loads(_retained(group_broker, topic) or b"{}")
        assert state.get("status") == "idle", state
    finally:
        dev.close()


def test_a_worker_killed_for_good_is_answered_for_by_the_leader(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    """No replacement comes: the leader finds the dead worker's journal (nobody holds its
    lock), answers its request `interrupted` and frees its duplicate record, so the
    device's retry (same id and payload) is served at once by the worker left."""
    g = group(2, BRIDGE_LEADER_TTL="3", BRIDGE_SESSION_EXPIRY="1")
    dev = Device(group_broker, "orphan1", g.prefix)
    payload = f"{SLOW} a request whose worker dies"
    try:
        owner = _kill_its_worker(g, dev, "o1", payload)
        terminal = dev.wait_raw("o1", 15)[-1]
        assert terminal.get("error", {}).get("code") == "interrupted", terminal
        survivor = g.procs[1 - owner].logs()
        assert f"worker {WORKERS[owner]} is gone: sent 1 interrupted terminals" in survivor
        time.sleep(1.5)  # the dead worker's session (and its share of requests) expires
        _retry_served(dev, "o1", payload)
        dev.quiet_after("o1")
    finally:
        dev.close()


def test_a_silent_worker_on_another_host_has_its_session_taken_over(
    group: Callable[..., Group], group_broker: Broker, redis_server: Redis
) -> None:
    """Two hosts (a data folder each, Redis between them); one worker dies for good
    while it serves a request. Mosquitto goes on queueing its share of new requests
    in its session; the worker left takes that session over: what waited there is
    served, later requests all reach it. The request that died with the other worker
    gets its one `interrupted` terminal from the store's holds (its journal is out of
    reach), also when that worker comes back later, and its retry is served, not
    dropped as a duplicate."""
    users = {f"BRIDGE_MQTT_URL_{i + 1}": group_broker.url(u) for i, u in enumerate(WORKERS)}
    g = group(2, hosts=True, BRIDGE_STATE_URL=redis_server.url, BRIDGE_LEADER_TTL="2", **users)
    dev = Device(group_broker, "host1", g.prefix)
    payload = f"{SLOW} a request whose worker dies"
    try:
        dead = _kill_its_worker(g, dev, "o1", payload)
        left = 1 - dead
        for k in range(6):  # about half of them go to the dead worker's session
            _ask(dev, f"h{k}")
        for k in range(6):
            assert dev.wait(f"h{k}", 20).terminal.get("done") is True
        said = f"worker {WORKERS[dead]} was silent: took over its broker session"
        deadline = time.monotonic() + 10
        while said not in g.procs[left].logs():
            assert time.monotonic() < deadline, g.procs[left].logs()[-1500:]
            time.sleep(0.1)
        start = time.monotonic()
        for k in range(4):
            assert dev.ask({"id": f"n{k}", "messages": [{"role": "user", "content": "hi"}]},
                           timeout=5).terminal.get("done") is True  # fmt: skip
        assert time.monotonic() - start < 5
        assert all(f"id=n{k} model=" in g.procs[left].logs() for k in range(4))
        end = dev.wait_raw("o1", 10)[-1]
        assert end == {"seq": SEQ_UNKNOWN, "error": {"code": "interrupted", "message": ANY}}
        g.start(dead)  # its host is back: its journal still holds o1
        deadline = time.monotonic() + 15
        while "sent 0 interrupted terminals for requests of a previous run" not in (
            g.procs[dead].logs()
        ):
            assert time.monotonic() < deadline, g.procs[dead].logs()[-1500:]
            time.sleep(0.1)
        time.sleep(0.3)
        assert [m for m in dev.messages("o1") if "error" in m or "done" in m] == [end]
        _retry_served(dev, "o1", payload)
    finally:
        dev.close()


def test_a_worker_cut_off_from_the_store_and_taken_for_dead_sends_no_second_terminal(
    group: Callable[..., Group], group_broker: Broker, redis_server: Redis
) -> None:
    """A worker that loses the store (not the broker) for longer than the TTL while it
    streams is taken for dead: the leader answers its request `interrupted`. When the
    worker reaches the store again it learns so and stops that stream, with no terminal
    of its own: the device gets exactly one."""
    proxy = TcpProxy(redis_server.port)
    users = {f"BRIDGE_MQTT_URL_{i + 1}": group_broker.url(u) for i, u in enumerate(WORKERS)}
    g = group(1, hosts=True, BRIDGE_STATE_URL=redis_server.url, BRIDGE_LEADER_TTL="2", **users)
    g.env["BRIDGE_STATE_URL"] = f"redis://127.0.0.1:{proxy.port}/0"  # the second one's way
    g.start(1)
    g.wait_subscribed(1)
    dev = Device(group_broker, "cut1", g.prefix)
    long = "[mock tokens=320 delay_ms=25] a long one"  # 8 s
    try:
        rids = []
        while not rids or _served_by(g, rids[-1]) != [1]:
            assert len(rids) < 6, [_served_by(g, r) for r in rids]
            rids.append(f"c{len(rids)}")
            _ask(dev, rids[-1], long)
            deadline = time.monotonic() + 5
            while not _served_by(g, rids[-1]):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        victim = rids[-1]
        asked = time.monotonic()
        while not dev.messages(victim):
            time.sleep(0.05)
        proxy.cut()
        end = dev.wait_raw(victim, 15)[-1]  # the leader's answer
        assert end == {"seq": SEQ_UNKNOWN, "error": {"code": "interrupted", "message": ANY}}
        proxy.mend()
        said = "was taken for dead (cut off from the shared store): the leader answered 1"
        deadline = time.monotonic() + 15
        while said not in g.procs[1].logs():
            assert time.monotonic() < deadline, g.procs[1].logs()[-2000:]
            time.sleep(0.1)
        assert time.monotonic() - asked < 7, "the stream had ended: nothing was stopped"
        time.sleep(max(0.5, asked + 8.5 - time.monotonic()))  # past the stream's own end
        got = dev.messages(victim)
        assert [m for m in got if "error" in m or "done" in m] == [end], got[-3:]
        assert f"stopped device=cut1 id={victim}: answered by the leader" in g.procs[1].logs()
    finally:
        dev.close()
        proxy.close()


def test_workers_share_limits_through_redis_and_ride_out_its_restart(
    group: Callable[..., Group], group_broker: Broker, redis_server: Redis
) -> None:
    policy = {"default": {"max_streams": 1}}
    g = group(2, BRIDGE_STATE_URL=redis_server.url, BRIDGE_POLICY=json.dumps(policy))
    dev = Device(group_broker, "redis1", g.prefix)
    try:
        for rid in ("r1", "r2", "r3"):
            _ask(dev, rid, f"{SLOW} long one")
        codes = [dev.wait(rid).error_code for rid in ("r1", "r2", "r3")]
        assert codes.count(None) == 1 and codes.count("too_many_streams") == 2, codes

        redis_server.stop()
        for rid in ("d1", "d2"):  # still served, each worker counting alone
            assert dev.ask({"id": rid, "messages": [{"role": "user", "content": "hi"}]}).terminal[
                "done"
            ]
        assert any("shared state store unavailable" in p.logs() for p in g.procs.values())
        redis_server.start()
        deadline = time.monotonic() + 15
        while not all("shared state store is back" in p.logs() for p in g.procs.values()):
            assert time.monotonic() < deadline, "the workers never said the store is back"
            for i in range(4):
                rid = f"after{time.monotonic_ns()}{i}"
                dev.ask({"id": rid, "messages": [{"role": "user", "content": "hi"}]})
        for rid in ("x1", "x2", "x3"):
            _ask(dev, rid, f"{SLOW} long one")
        codes = [dev.wait(rid).error_code for rid in ("x1", "x2", "x3")]
        assert codes.count(None) == 1 and codes.count("too_many_streams") == 2, codes
    finally:
        dev.close()


def test_without_a_group_the_bridge_subscribes_as_before(
    group_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """Two bridges without BRIDGE_GROUP both answer: the group is what makes one answer."""
    prefix = "solo"
    procs = []
    for user in WORKERS[:2]:
        e = bridge_env(group_broker, mock_llm.base_url, BRIDGE_MQTT_URL=group_broker.url(user),
                       BRIDGE_CLIENT_ID=user, BRIDGE_TOPIC_PREFIX=prefix,
                       BRIDGE_DATA_DIR=str(tmp_path / user))  # fmt: skip
        procs.append(BridgeProcess(tmp_path / user, e).start())
    dev = Device(group_broker, "solo1", prefix)
    try:
        wait_for_status(group_broker, prefix, "online")
        for p in procs:
            while "connected to" not in p.logs():
                time.sleep(0.05)
        time.sleep(0.3)
        _ask(dev, "one")
        dev.wait_raw("one")  # two replies interleaved: each bridge answers
        time.sleep(0.5)
        assert sum("id=one model=" in p.logs() for p in procs) == 2
    finally:
        dev.close()
        for p in procs:
            p.stop()


def test_workers_flag_runs_a_group_and_restarts_a_killed_worker(
    group_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """`llm-bridge run --workers 3`: three processes share the requests; one killed with
    SIGKILL under load is started again under its id, and every request ends served."""
    prefix = f"w{next(_prefixes)}"
    e = bridge_env(group_broker, mock_llm.base_url, BRIDGE_CLIENT_ID="bridge",
                   BRIDGE_TOPIC_PREFIX=prefix, BRIDGE_DATA_DIR=str(tmp_path / "data"),
                   BRIDGE_STATE="false", BRIDGE_HA_DISCOVERY="false",
                   BRIDGE_MQTT_URL_2=group_broker.url("bridge-2"),
                   BRIDGE_MQTT_URL_3=group_broker.url("bridge-3"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    env.update(e, PYTHONPATH=str(REPO))
    log = (tmp_path / "workers.log").open("wb")
    cmd = [sys.executable, "-m", "bridge", "run", "--workers", "3", "--group", "wg"]
    sup = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    dev = Device(group_broker, "workers1", prefix)
    try:
        wait_for_status(group_broker, prefix, "online")
        deadline = time.monotonic() + 20
        while (tmp_path / "workers.log").read_text().count("connected to") < 3:
            assert time.monotonic() < deadline, (tmp_path / "workers.log").read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)
        children = _children(sup.pid)
        assert len(children) == 3, children
        rids = [f"w{i}" for i in range(18)]
        payload = {rid: f"{SLOW} request {rid}" for rid in rids}
        for rid in rids:
            _ask(dev, rid, payload[rid])
        time.sleep(0.4)
        os.kill(children[1], signal.SIGKILL)
        for rid in rids:
            if dev.wait_raw(rid, 20)[-1].get("error", {}).get("code") == "interrupted":
                with dev._cond:
                    dev.replies[rid].clear()
                _ask(dev, rid, payload[rid])
        for rid in rids:
            assert dev.wait(rid, 20).terminal.get("done") is True, rid
        assert len(_children(sup.pid)) == 3, "the killed worker was started again"
        text = (tmp_path / "workers.log").read_text()
        assert "exited with -9; starting it again" in text
        assert "sent 1" in text or "interrupted terminals" in text
    finally:
        dev.close()
        sup.send_signal(signal.SIGTERM)
        sup.wait(30)
        log.close()
    assert not _children(sup.pid)
    assert API_KEY not in (tmp_path / "workers.log").read_text()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _retained(broker: Broker, topic: str, timeout: float = 2.0) -> bytes | None:
    """The retained message on `topic` now (None when there is none)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.username_pw_set("integrations", broker.users["integrations"])
    c.on_message = lambda _c, _u, m: got.append(m.payload) if m.retain else None
    c.on_connect = lambda cl, *_a: cl.subscribe(topic, qos=1)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    return got[-1] if got else None


def test_the_leader_publishes_stats_once_and_a_peer_takes_over_when_it_dies(
    group: Callable[..., Group], group_broker: Broker
) -> None:
    g = group(2, BRIDGE_STATE="true", BRIDGE_LEADER_TTL="1.5")
    dev = Device(group_broker, "lead1", g.prefix)
    try:
        leaders = [i for i, p in g.procs.items() if "now leads group" in p.logs()]
        assert len(leaders) == 1, [p.logs()[-500:] for p in g.procs.values()]
        for i in range(6):
            dev.ask({"id": f"a{i}", "messages": [{"role": "user", "content": "hi"}]})
        time.sleep(1.5)  # stats are coalesced for up to a second
        stats = json.loads(_retained(group_broker, f"{g.prefix}/bridge/stats") or b"{}")
        assert stats.get("requests") == 6, stats  # the group's count, whoever served them

        g.procs[leaders[0]].kill()  # its last will says offline
        other = 1 - leaders[0]
        deadline = time.monotonic() + 10
        while "now leads group" not in g.procs[other].logs():
            assert time.monotonic() < deadline, g.procs[other].logs()[-1500:]
            time.sleep(0.1)
        wait_for_status(group_broker, g.prefix, "online", timeout=5)
        # Mosquitto keeps assigning requests to the dead worker's session: its
        # replacement (the supervisor's restart) gets them; it does not lead.
        before = len(g.procs[leaders[0]].logs())
        g.start(leaders[0])
        g.wait_subscribed(leaders[0])
        for i in range(3):
            dev.ask({"id": f"b{i}", "messages": [{"role": "user", "content": "hi"}]})
        time.sleep(1.5)
        stats = json.loads(_retained(group_broker, f"{g.prefix}/bridge/stats") or b"{}")
        assert stats.get("requests") == 9, stats
        assert "now leads group" not in g.procs[leaders[0]].logs()[before:]
    finally:
        dev.close()


def test_replicas_with_one_environment_take_worker_slots(
    group_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """`--scale bridge=N`: identical replicas become bridge, bridge-2 (each its own broker
    user); a replica that restarts takes its own slot back."""
    prefix = f"r{next(_prefixes)}"
    procs = []
    for owner in ("host-a", "host-b"):
        e = bridge_env(group_broker, mock_llm.base_url, BRIDGE_CLIENT_ID="bridge",
                       BRIDGE_TOPIC_PREFIX=prefix, BRIDGE_GROUP="rg", BRIDGE_WORKER_SLOTS="3",
                       BRIDGE_DATA_DIR=str(tmp_path / "data"), BRIDGE_STATE="false",
                       BRIDGE_HA_DISCOVERY="false", LLM_BRIDGE_SLOT_OWNER=owner,
                       BRIDGE_MQTT_URL_2=group_broker.url("bridge-2"),
                       BRIDGE_MQTT_URL_3=group_broker.url("bridge-3"))  # fmt: skip
        procs.append(BridgeProcess(tmp_path / owner, e).start())
        deadline = time.monotonic() + 15
        while "connected to" not in procs[-1].logs():
            assert time.monotonic() < deadline, procs[-1].logs()[-1000:]
            time.sleep(0.05)
    dev = Device(group_broker, "slots1", prefix)
    try:
        slots = [re.findall(r"worker slot (\d+) of 3", p.logs()) for p in procs]
        assert slots == [["1"], ["2"]], slots
        time.sleep(0.3)
        for i in range(6):
            assert dev.ask({"id": f"s{i}", "messages": [{"role": "user", "content": "hi"}]})
        assert all("model=mock-1" in p.logs() for p in procs), "both replicas served"
        procs[0].kill()
        procs[0] = BridgeProcess(tmp_path / "host-a", procs[0].env).start()
        deadline = time.monotonic() + 15
        while len(re.findall(r"worker slot (\d+) of 3", procs[0].logs())) < 2:
            assert time.monotonic() < deadline, procs[0].logs()[-1000:]
            time.sleep(0.05)
        assert re.findall(r"worker slot (\d+) of 3", procs[0].logs())[-1] == "1"
    finally:
        dev.close()
        for p in procs:
            p.stop()


def test_mosquitto_announces_a_receive_maximum_it_does_not_enforce_for_qos1(
    group_broker: Broker,
) -> None:
    """What the stock window means for the bridge (docs/performance.md, "Stock broker"):
    Mosquitto 2.0 announces max_inflight_messages (20) as its Receive Maximum, but takes
    any number of unacknowledged QoS 1 publishes from a client and acknowledges them all."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    props: list[Any] = []
    acks: list[int] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bridge-3", protocol=paho.MQTTv5)
    c.username_pw_set("bridge-3", group_broker.users["bridge-3"])
    c.max_inflight_messages_set(0)  # as the bridge: no client-side window
    c.on_connect = lambda _c, _u, _f, _rc, p: props.append(p)
    c.on_publish = lambda *_a: acks.append(1)
    c.connect("127.0.0.1", group_broker.port)
    c.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not props:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert props[0].ReceiveMaximum == 20
        for _ in range(500):
            c.publish("llm/bridge/window-probe", b"x", qos=1)
        while len(acks) < 500:
            assert time.monotonic() < deadline + 5, len(acks)
            time.sleep(0.02)
        assert c.is_connected()
    finally:
        c.disconnect()
        c.loop_stop()
