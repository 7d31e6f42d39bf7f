"""The bridge: requests enter in `submit`, go upstream in `_attempt`, chunks leave in `_emit`.

One asyncio task per request. Every request ends with exactly one terminal
message, built from the job in `_end` (the `finally` of `_run`), whatever
happened before it; its journal slot is freed only when the broker has
acknowledged that terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.core import protocol as p
from bridge.core.chunking import Chunker
from bridge.core.errors import ProtocolError, UpstreamError
from bridge.core.group import peer_url
from bridge.core.job import Job
from bridge.core.journal import Interrupted, Journal
from bridge.core.mqtt import MqttLink, Will
from bridge.core.plugin import Handler, Inbound, Plugin, overrides
from bridge.core.reply import DELTA, ReplyFold
from bridge.core.router import Router
from bridge.core.settings import MqttUrl, Settings
from bridge.core.shared import Guarded, Held, Settled, open_store
from bridge.core.topics import Topics
from bridge.core.upstream import DETAIL_CHARS, Upstream

log = logging.getLogger("bridge")

# At most 4 MB of journal (1 KiB a slot); a request that finds no slot is refused.
JOURNAL_SLOTS = 4096
# MQTT v5 properties a request may carry, bounded so that its journal slot holds them.
MAX_RESPONSE_TOPIC_BYTES = 256
MAX_CORRELATION_BYTES = 256
# Fair start: while requests are being started (from admission, or from their
# stream slot, until their API call is written), running streams pause before
# each piece, so that a start is not queued behind their chunks in the event
# loop (docs/performance.md, "Fair start"). A pause lasts at most START_HOLD, and
# the next can begin only START_GAP after it: a flood of new requests holds
# running streams half of the time at most and never starves them. Waiting for
# the API's answer is not held.
START_HOLD = 0.1
START_GAP = 0.1
# Taking over a dead worker's session: how long to wait for the connection, and
# how long without a message ends it (what the broker queued comes at once).
TAKE_OVER_WAIT = 10.0
TAKE_OVER_QUIET = 1.0
# A request's end without a terminal of its own: the leader answered it (`_taken_for_dead`).
_ANSWERED = "answered_by_the_leader"


class Recent:
    """Requests recently accepted, to drop a second delivery of one.

    Bounded in entries per device and overall (each entry is a key, a 16-byte
    digest and a time: about 200 bytes), so a device inventing ids or device
    ids costs bounded memory; the least recently active device loses its
    oldest entries first.
    """

    def __init__(self, window: float, per_device: int = 64, total: int = 20_000) -> None:
        self.window = window
        self.per_device = per_device
        self.total = total
        self.count = 0
        self._devices: OrderedDict[str, OrderedDict[str, tuple[bytes, float]]] = OrderedDict()

    def claim(self, device: str, key: str, digest: bytes, now: float) -> bool:
        """Take `key` of `device` for this payload: False when it is a duplicate."""
        if self.duplicate(device, key, digest, now):
            return False
        self.remember(device, key, digest, now)
        return True

    def take(self, device: str, key: str, digest: bytes, now: float, held: Held) -> bool:
        """`claim` for a request the bridge takes in hand (one bridge: its journal
        answers for it, nothing more to hold)."""
        return self.claim(device, key, digest, now)

    def duplicate(self, device: str, key: str, digest: bytes, now: float) -> bool:
        """Whether `key` of `device` was accepted with the same payload within the window."""
        seen = self._devices.get(device)
        entry = seen.get(key) if seen is not None else None
        return entry is not None and entry[0] == digest and now - entry[1] < self.window

    def remember(self, device: str, key: str, digest: bytes, now: float) -> None:
        seen = self._devices.get(device)
        if seen is None:
            seen = self._devices[device] = OrderedDict()
        else:
            self._devices.move_to_end(device)
            if seen.pop(key, None) is not None:
                self.count -= 1
        seen[key] = (digest, now)
        self.count += 1
        if len(seen) > self.per_device:
            seen.popitem(last=False)
            self.count -= 1
        while self.count > self.total:
            oldest_device, oldest = next(iter(self._devices.items()))
            oldest.popitem(last=False)
            self.count -= 1
            if not oldest:
                del self._devices[oldest_device]

    def forget(self, device: str, key: str) -> None:
        """A request that ended with an error may be asked again with the same payload."""
        seen = self._devices.get(device)
        if seen is not None and seen.pop(key, None) is not None:
            self.count -= 1
            if not seen:
                del self._devices[device]

    def release(self, device: str, key: str, digest: bytes) -> None:
        """A request was refused after `claim`: its key is free again (unless a later
        payload took it)."""
        seen = self._devices.get(device)
        entry = seen.get(key) if seen is not None else None
        if entry is not None and entry[0] == digest:
            self.forget(device, key)


class SharedRecent:
    """`Recent` for a worker group: one table in the group's store, so a request taken
    by one worker is a duplicate for all (docs/scaling.md).

    `claim` takes the request atomically (a second worker asking at the same
    moment sees a duplicate); `take` also holds it for this worker in the same
    step (should the worker die, the one that answers for it finds where its
    terminal goes); `release` gives it back when it is refused.
    """

    def __init__(self, store: Guarded, window: float, worker: str) -> None:
        self.store = store
        self.window = window
        self.worker = worker

    def claim(self, device: str, key: str, digest: bytes, now: float) -> bool:
        return self.store.claim(device, key, digest, time.time(), self.window)

    def take(self, device: str, key: str, digest: bytes, now: float, held: Held) -> bool:
        return self.store.take(self.worker, held, digest, time.time(), self.window)

    def remember(self, device: str, key: str, digest: bytes, now: float) -> None:
        self.claim(device, key, digest, now)

    def forget(self, device: str, key: str) -> None:
        self.store.forget(device, key)

    def release(self, device: str, key: str, digest: bytes) -> None:
        self.store.forget(device, key, digest)


class Bridge:
    """Serves the protocol between one MQTT broker and one OpenAI-compatible API.

    It is the plugins' `Host` (bridge/core/plugin.py).

    Args:
        settings: the configuration.
        upstream: the API client; made from the settings when not given.
        plugins: policy, state, integrations, metrics..., called in order.
    """

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream | None = None,
        plugins: list[Plugin] | None = None,
    ) -> None:
        self.settings = settings
        self.plugins = plugins or []
        self._keep_text = any(pl.needs_text for pl in self.plugins)
        self._text_plugins = [pl for pl in self.plugins if overrides(pl, "text")]
        self._preparers = [pl for pl in self.plugins if overrides(pl, "prepare")]
        self._rounders = [pl for pl in self.plugins if overrides(pl, "next_round")]
        self._finishers = [pl for pl in self.plugins if overrides(pl, "finishing")]
        self.topics = Topics(settings.topic_prefix)
        self.upstream = upstream or Upstream(settings)
        self.qos = settings.response_qos
        self.jobs: dict[tuple[str, str], Job] = {}
        # A worker group (BRIDGE_GROUP) shares its duplicates, limits and leader in a store.
        self.worker = settings.client_id
        self.shared: Guarded | None = None
        self.recent: Recent | SharedRecent = Recent(settings.dedup_window)
        if settings.group:
            self.shared = open_store(
                settings.state_url, settings.data_dir, settings.group, self.worker
            )
            self.recent = SharedRecent(self.shared, settings.dedup_window, self.worker)
        self._slots = asyncio.Semaphore(settings.max_streams)
        self._starting = 0  # requests admitted (and given a slot) whose API call is not written yet
        self._no_starts = asyncio.Event()
        self._no_starts.set()
        self._hold_until = 0.0
        self._recovered = False  # the previous run's requests answered (at the first connect)
        self.active = 0
        self._accepting = True
        self._later: set[asyncio.Task[None]] = set()
        self.router = Router()
        self.router.add(self.topics.req_filter, self._on_request, shared=True)
        self.router.add(self.topics.cancel_filter, self._on_cancel)
        # A group's leader publishes the bridge-wide retained messages; it watches the
        # status, which a worker's last will may have set to `offline`.
        self._leading = not settings.group
        self._status_seen: bytes | None = None
        self._leader: asyncio.Task[None] | None = None
        if settings.group:
            self.router.add(self.topics.status, self._on_status)
        self.journal: Journal | None = None
        self._adopted: dict[Path, Journal] = {}  # dead workers' journals being answered
        self._taking_over: dict[str, asyncio.Task[None]] = {}  # dead workers' sessions
        self._known_alive = False  # the store had this worker among the living at a beat
        if settings.journal:
            self.journal = Journal(
                settings.data_dir / f"inflight-{settings.client_id}.journal",
                min(settings.max_streams + settings.max_queue + 16, JOURNAL_SLOTS),
            )
        self._attaching = True
        for plugin in self.plugins:
            plugin.attach(self)
        self._attaching = False
        self.link = MqttLink(
            settings.mqtt,
            client_id=settings.client_id,
            on_message=self._on_message,
            subscriptions=self.router.subscriptions(settings.group),
            clean_start=False,
            session_expiry=settings.session_expiry,
            keepalive=settings.mqtt_keepalive,
            will=Will(self.topics.status, b"offline", qos=1, retain=True),
            on_connect=self._online,
            manual_ack=True,
            version=5 if settings.mqtt_version == "5" else 4,
            ca_file=settings.mqtt_ca_file,
            tls_insecure=settings.mqtt_tls_insecure,
        )

    # --- what plugins get (Host) ------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    @property
    def leading(self) -> bool:
        return self._leading

    async def subscribed(self) -> None:
        await self.link.subscribed.wait()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
    ) -> None:
        props = None
        if expiry is not None and self.settings.mqtt_version == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = expiry
        try:
            self.link.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ConnectionError as exc:
            log.warning("could not publish %s: %s", topic[:200], exc)

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, shared: bool = False
    ) -> None:
        if not self._attaching:
            raise RuntimeError("plugins subscribe in attach(), before the bridge connects")
        self.router.add(topic_filter, handler, qos, shared)

    async def unsubscribe(self, topic_filter: str) -> None:
        await self.link.unsubscribe([topic_filter])

    def emit(self, job: Job, message: dict[str, Any]) -> None:
        payload = p.progress_message(job.seq, message)
        if self.journal is not None:
            self.journal.set_seq(job.slot, job.seq + 1)
        self._send(job, payload)

    def job(self, device: str, rid: str) -> Job | None:
        return self.jobs.get((device, rid))

    def jobs_running(self) -> tuple[int, int]:
        return self.active, len(self.jobs) - self.active

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, connect_timeout: float | None = None) -> None:
        """Connect to the broker and start serving."""
        if self.shared is not None:
            self._known_alive = self.shared.beat(self.worker, self.settings.leader_ttl,
                                                 time.time()) is not None  # fmt: skip
            self._campaign()
            self._leader = asyncio.create_task(self._lead(), name="leader")
        await self.link.start(timeout=connect_timeout)

    def _campaign(self) -> None:
        """Take or renew the group's leader lease; say when it changes hands."""
        assert self.shared is not None
        leading = self.shared.lead(self.worker, self.settings.leader_ttl, time.time())
        if leading != self._leading:
            self._leading = leading
            change = "now leads" if leading else "no longer leads"
            log.warning("worker %s %s group %s", self.worker, change, self.settings.group)
        if leading and self.connected and self._status_seen not in (None, b"online"):
            # A worker that died (its last will) or stopped said `offline` for the group.
            self.link.publish(self.topics.status, b"online", qos=1, retain=True)
            self._status_seen = b"online"

    async def _lead(self) -> None:
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.settings.leader_ttl / 3)
            known = self.shared.beat(self.worker, self.settings.leader_ttl, time.time())
            if known is False and self._known_alive:
                self._taken_for_dead()
            self._known_alive = self._known_alive or known is not None
            try:
                self._campaign()
            except Exception:
                log.exception("leader election failed")
            if self._leading and self.connected and self._accepting:
                try:
                    self._adopt_orphans()
                    self._take_over_silent()
                except Exception:
                    log.exception("answering for a dead worker failed")

    def _on_status(self, msg: Inbound) -> None:
        self._status_seen = msg.payload
        if self._leading and self._accepting and msg.payload == b"offline":
            self._campaign()

    async def stop(self) -> None:
        """Stop cleanly: finish what runs (within the grace), then say `offline`.

        Requests still running after `BRIDGE_SHUTDOWN_GRACE` end with
        `interrupted`; requests not yet received stay queued at the broker for
        the next start. A worker of a group first leaves the group's shared
        subscription: the broker then gives new requests to the other workers
        instead of queueing them in this worker's session, for a return that
        may never come (a scale-down); a restart joins again.
        """
        if self.settings.group and self.connected:
            shared = self.router.shared_subscriptions(self.settings.group)
            if await self.link.unsubscribe(shared):
                log.info("left worker group %s", self.settings.group)
        self._accepting = False
        self._stop_leading()
        running = [j.task for j in self.jobs.values() if j.task is not None]
        if running:
            _done, pending = await asyncio.wait(running, timeout=self.settings.shutdown_grace)
            for job in list(self.jobs.values()):
                if job.task in pending:
                    job.cancel_code = p.INTERRUPTED
                    job.cancel_message = "the bridge is shutting down"
                    job.task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self.connected:
            self._each("stopping")
            self.link.publish(self.topics.status, b"offline", qos=1, retain=True)
        await self.link.stop()
        await self.upstream.aclose()
        if self.journal is not None:
            self.journal.close()
        for adopted in self._adopted.values():
            adopted.close()  # what was not acknowledged is answered by whoever opens it next
        self._adopted.clear()
        if self.shared is not None:
            self.shared.leave(self.worker)
            self.shared.close()

    def _stop_leading(self) -> None:
        for task in list(self._taking_over.values()):
            task.cancel()  # what it did not take stays in that session
        if self._leader is not None:
            self._leader.cancel()
            if self.shared is not None and self._leading:
                self.shared.resign(self.worker)
                self._leading = False

    def _online(self) -> None:
        self.link.publish(self.topics.status, b"online", qos=1, retain=True)
        journal = self.journal
        if not self._recovered:  # once: what the previous run of this worker left
            self._recovered = True
            journaled = journal is not None and bool(journal.pending)
            if journaled or self.shared is not None:
                count = self._answer_interrupted(journal, self.worker)
                if count or journaled:
                    log.warning(
                        "sent %d interrupted terminals for requests of a previous run", count
                    )
        self._each("connected")

    def _answer_interrupted(
        self, journal: Journal | None, worker: str, answered: Callable[[], None] | None = None
    ) -> int:
        """Publish one `interrupted` terminal for each request `journal` recovered.

        In a group, a request of `worker` that a peer already answered from the
        store's holds (`_take_over_silent`) is skipped, and the rest can no
        longer be answered there: each gets exactly one terminal. The holds the
        journal has no slot for (the worker died between taking a request and
        journaling it, or keeps no journal) are answered from the store, as the
        leader does for a worker on another host. Each slot is freed when the
        broker acknowledges its terminal (until then paho holds the message in
        the session and resends it); `answered` is called once all are.
        """
        shared = self.shared
        settled = shared.settle(worker) if shared is not None else None
        recovered: list[Interrupted] = []
        sent = 0
        if journal is not None:
            recovered, journal.pending = journal.pending, []
            sent = self._answer_journal(journal, recovered, settled, answered)
        if shared is not None and settled is not None:
            journaled = {(gone.device, gone.key) for gone in recovered}
            mine = worker == self.worker
            running = {_held_key(job) for job in self.jobs.values()} if mine else set()
            for held in settled.holds:
                key = (held.device, held.key)
                if key in running:  # this run took it in hand already: held again
                    shared.hold(self.worker, held)
                elif key not in journaled:
                    self._answer_from_holds([held])
                    sent += 1
        return sent

    def _answer_journal(
        self, journal: Journal, recovered: list[Interrupted], settled: Settled | None,
        answered: Callable[[], None] | None,
    ) -> int:  # fmt: skip
        """`_answer_interrupted` for the slots of `journal`: how many terminals it sent."""
        left = len(recovered)
        done = settled.answered if settled is not None else set()

        def acked(slot: int) -> None:
            nonlocal left
            journal.remove(slot)
            left -= 1
            if left == 0 and answered is not None:
                answered()

        sent = 0
        for gone in recovered:
            if (gone.device, gone.key) in done:
                acked(gone.slot)
                continue
            if gone.device is not None and gone.key is not None:
                # Its retry (same id and payload) is a new try, whichever worker gets it.
                self.recent.forget(gone.device, gone.key)
            self._publish_interrupted(gone.topic, gone.seq, gone.correlation,
                                      functools.partial(acked, gone.slot))  # fmt: skip
            sent += 1
        return sent

    def _publish_interrupted(
        self, topic: str, seq: int, correlation: bytes | None,
        on_ack: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """The terminal of a request whose bridge stopped while answering it."""
        message = "the bridge stopped while answering; ask again"
        self.link.publish(topic, p.error_message(seq, p.INTERRUPTED, message), 1,
                          properties=_reply_props(correlation), on_ack=on_ack)  # fmt: skip

    def _adopt_orphans(self) -> None:
        """Answer for the journals of group workers that died and did not come back.

        A worker holds a lock on its journal while it runs; a journal in the
        data folder that nobody holds belongs to a dead worker. Its replacement
        would answer its requests at start; one that never comes would leave
        their devices waiting, and the requests' duplicate records would drop
        the devices' retries for the whole dedup window. The leader answers
        them (`interrupted`), frees their records and the dead worker's stream
        counts, and lets the journal go once the broker has taken the answers.
        Only workers that share `BRIDGE_DATA_DIR` (one host) see each other's.
        """
        own = self.journal.path if self.journal is not None else None
        for path in sorted(self.settings.data_dir.glob("inflight-*.journal")):
            if path == own or path in self._adopted:
                continue
            try:
                orphan = Journal.adopt(path, JOURNAL_SLOTS)
            except OSError as exc:
                log.warning("cannot read journal %s: %s", path.name, exc)
                continue
            if orphan is None:
                continue  # its worker runs
            worker = path.name.removeprefix("inflight-").removesuffix(".journal")
            if self.shared is not None:
                self.shared.drop_worker(worker)
            if not orphan.pending:
                orphan.close()
                continue
            self._adopted[path] = orphan

            def release(path: Path = path) -> None:
                done = self._adopted.pop(path, None)
                if done is not None:
                    done.close()

            count = self._answer_interrupted(orphan, worker, release)
            log.warning(
                "worker %s is gone: sent %d interrupted terminals for its requests", worker, count
            )

    def _take_over_silent(self) -> None:
        """Take over the broker sessions of workers that stopped beating and did not stop
        cleanly (a host that died, a kill -9 with no supervisor).

        Mosquitto keeps giving such a worker its share of the group's requests and
        queues them in its session, where they would wait for a return that may
        never come (docs/scaling.md). The leader connects under the worker's
        client id and broker user, leaves the shared subscriptions there (no new
        request is queued for the dead worker) and serves what was queued.
        """
        assert self.shared is not None
        now = time.time()
        for worker in self.shared.silent(now):
            if worker == self.worker or worker in self._taking_over:
                continue
            url = peer_url(self.worker, self.settings.mqtt_url, worker, dict(os.environ))
            if not self.shared.take_silent(worker, now):
                continue  # another leader took it
            self.shared.drop_worker(worker)  # its streams ended with it
            self._answer_holds(worker, now)
            if url is None:
                log.warning(
                    "worker %s is silent, and its broker user does not follow the group's "
                    "names: its session is left to expire", worker,
                )  # fmt: skip
                continue
            task = asyncio.create_task(self._take_over(worker, url), name=f"take over {worker}")
            self._taking_over[worker] = task
            task.add_done_callback(functools.partial(self._taken_over, worker))

    def _answer_holds(self, worker: str, now: float) -> None:
        """End the requests a dead worker had taken in hand with `interrupted`.

        Their journal is on the dead worker's host, out of reach; the store's
        holds say where each reply goes, not how far it went, so the terminal
        carries `SEQ_UNKNOWN`. Should that worker come back, its journal skips
        them (`settle`). Their retries must not be dropped as duplicates.
        """
        held = self.shared.take_holds(worker, now) if self.shared is not None else []
        self._answer_from_holds(held)
        if held:
            log.warning(
                "worker %s is silent: sent %d interrupted terminals for its requests",
                worker, len(held),
            )  # fmt: skip

    def _answer_from_holds(self, held: list[Held]) -> None:
        """`interrupted` for requests known only from the store's holds: where their
        replies go, not how far they went (`SEQ_UNKNOWN`); their retries are served."""
        for gone in held:
            self.recent.forget(gone.device, gone.key)
            self._publish_interrupted(gone.topic, p.SEQ_UNKNOWN, gone.correlation)

    def _taken_for_dead(self) -> None:
        """The leader took this worker for dead while it lived (cut off from the store
        longer than `BRIDGE_LEADER_TTL`, not from the broker) and answered the requests
        it held with `interrupted`: those stop here, without a second terminal. Their
        devices have retried; a stream going on would reach the retry as a gap."""
        assert self.shared is not None
        answered = self.shared.take_answered(self.worker)
        stopped = 0
        for job in list(self.jobs.values()):
            if _held_key(job) in answered and job.task is not None:
                job.cancel_code = _ANSWERED
                _cancel_soon(job.task)
                stopped += 1
        log.error(
            "worker %s was taken for dead (cut off from the shared store): the leader "
            "answered %d of its requests; they stop here", self.worker, stopped,
        )  # fmt: skip

    def _taken_over(self, worker: str, _task: asyncio.Task[None]) -> None:
        self._taking_over.pop(worker, None)

    async def _take_over(self, worker: str, url: str) -> None:
        """Serve what the broker holds in a dead worker's session; leave its group there."""
        got = 0

        def on_message(msg: paho.MQTTMessage) -> None:
            nonlocal got
            got += 1
            self._on_message(msg, link)

        s = self.settings
        link = MqttLink(
            MqttUrl.parse(url), client_id=worker, on_message=on_message, clean_start=False,
            session_expiry=s.session_expiry, keepalive=s.mqtt_keepalive, manual_ack=True,
            version=5 if s.mqtt_version == "5" else 4, ca_file=s.mqtt_ca_file,
            tls_insecure=s.mqtt_tls_insecure, reconnect=False,
        )  # fmt: skip
        try:
            await link.start(timeout=TAKE_OVER_WAIT)
        except TimeoutError as exc:
            log.warning("cannot take over the session of silent worker %s: %s", worker, exc)
            return
        try:
            # No new request is queued there from now on; what was queued comes first.
            await link.unsubscribe(self.router.shared_subscriptions(s.group))
            while link.connected.is_set():
                seen = got
                await asyncio.sleep(TAKE_OVER_QUIET)
                if got == seen:
                    break
        finally:
            # The session stays until it expires, without the group's subscription: a
            # worker that comes back under that id resumes it and subscribes again.
            await link.stop()
        log.warning(
            "worker %s was silent: took over its broker session, %d messages waited there",
            worker, got,
        )  # fmt: skip

    def _each(self, name: str, *args: Any) -> None:
        """Call one plugin method on every plugin; a failing plugin is logged, never fatal."""
        for plugin in self.plugins:
            try:
                getattr(plugin, name)(*args)
            except Exception:
                log.exception("plugin %s.%s failed", type(plugin).__name__, name)

    # --- where messages enter -------------------------------------------------------------

    def _on_message(self, msg: paho.MQTTMessage, link: MqttLink | None = None) -> None:
        """Route one MQTT message (called in the loop, must not block or raise).

        A message is acknowledged once it is taken in hand; while the bridge
        stops it is not, so the broker keeps it for the next start. `link`: the
        connection it came on, when not the bridge's own (a session taken over).
        """
        if not self._accepting:
            return
        try:
            inbound = Inbound(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos,
                              getattr(msg, "properties", None), bool(msg.dup))  # fmt: skip
            if not self.router.route(inbound):
                log.warning("ignored message on unexpected topic %r", msg.topic[:200])
        finally:
            (link or self.link).ack(msg)

    def _device_of(self, msg: Inbound, kind: str) -> str | None:
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed[2] is not None:
            return None
        if not p.valid_device_id(parsed[0]):
            log.warning("ignored %s from invalid device id %r", kind, parsed[0][:80])
            return None
        return parsed[0]

    def _on_request(self, msg: Inbound) -> None:
        device = self._device_of(msg, "request")
        if device is None:
            return
        if msg.retain:
            # The broker replays a retained request at every subscription (each
            # restart, each reconnect): it was served when it arrived live.
            log.info("ignored the retained copy of a request from %s", device)
            return
        props = msg.properties
        self.submit(
            device,
            msg.payload,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            redelivered=msg.dup,
        )

    def _on_cancel(self, msg: Inbound) -> None:
        device = self._device_of(msg, "cancel")
        if device is not None and not msg.retain:
            self.cancel(device, msg.payload)

    def submit(
        self,
        device: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        redelivered: bool = False,
    ) -> Job | None:
        """Take a request: parse -> check its reply topic -> drop a duplicate -> admit -> queue.

        Anything refused is answered at once with its error terminal.

        Args:
            device: the device id from the topic.
            payload: the request as received.
            response_topic: an MQTT v5 Response Topic: the reply goes there
                (it must lie under `P/D/res/`), each message with `correlation`.
            redelivered: the broker's DUP flag: only such a delivery of a
                request without an id can be a duplicate.
        Returns:
            the started job, or None when the request was answered or dropped.
        """
        rid: str | None = None
        wrong_topic = self._reply_to_error(device, response_topic, correlation)
        reply_to = response_topic if wrong_topic is None else None
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        now = time.monotonic()
        try:
            try:
                req = p.parse_request(payload, self._size_limit(device))
            except ProtocolError as exc:
                # The same bytes are refused the same way: a second delivery of a
                # malformed request needs no second answer.
                if exc.request_id is not None and not self.recent.claim(
                    device, exc.request_id, digest, now
                ):
                    return None
                raise
            rid = req.id
            if wrong_topic is not None:
                raise ProtocolError(p.BAD_REQUEST, wrong_topic, rid)
            job_id = rid or p.new_request_id()
            key = _dedup_key(rid, digest)
            held = Held(device, key, reply_to or self.topics.res(device, job_id), correlation)
            # Only a request with an id, or a second delivery, can be a duplicate; the
            # others are remembered once taken, in case the broker delivers them again.
            claimed = rid is not None or redelivered
            if claimed and not self.recent.take(device, key, digest, now, held):
                log.info("dropped duplicate delivery device=%s id=%s", device, rid)
                return None
            try:
                for plugin in self.plugins:
                    plugin.admit(device, req, len(payload))
                job = self._queue(device, req, job_id, held, digest)
            except Exception:  # refused (or a plugin's bug): its retry is not a duplicate
                if claimed:
                    self._give_back(device, job_id, key, digest, now)
                raise
            if not claimed:
                self.recent.remember(device, key, digest, now)
                if self.shared is not None:
                    self.shared.hold(self.worker, held)
            return job
        except ProtocolError as exc:
            self._refuse(device, exc, rid or exc.request_id, reply_to, correlation)
            return None
        except Exception:  # a plugin's bug: the request still gets its one terminal
            log.exception("internal error taking a request of device=%s", device)
            error = ProtocolError(p.INTERNAL, "internal error")
            self._refuse(device, error, rid or p.salvage_id(payload), reply_to, correlation)
            return None

    def _give_back(self, device: str, rid: str, key: str, digest: bytes, now: float) -> None:
        """Undo the `take` of a request that was refused. Had it come to replace a
        request with its id that still runs, the id's duplicate record and hold are
        that one's again (the take wrote over them); else they go."""
        running = self.jobs.get((device, rid))
        if running is None:
            self.recent.release(device, key, digest)
            if self.shared is not None:
                self.shared.unhold(self.worker, device, key)
            return
        self.recent.remember(device, key, running.digest, now)
        if self.shared is not None:
            correlation = getattr(running.props, "CorrelationData", None)
            self.shared.hold(self.worker, Held(device, key, running.topic, correlation))

    def _size_limit(self, device: str) -> int:
        """The smallest of the bridge's and the plugins' request size limits for `device`."""
        limit = self.settings.max_request_bytes
        for plugin in self.plugins:
            own = plugin.max_request_bytes(device)
            if own:
                limit = min(limit, own)
        return limit

    def _reply_to_error(
        self, device: str, topic: str | None, correlation: bytes | None
    ) -> str | None:
        """Why a v5 response topic or correlation data is refused, or None when they are fine.

        A response topic may only point at the asking device's own replies, and
        both are bounded so that the request's journal slot holds them.
        """
        if correlation is not None and len(correlation) > MAX_CORRELATION_BYTES:
            return f"correlation data is longer than {MAX_CORRELATION_BYTES} bytes"
        if topic is None:
            return None
        base = self.topics.res_base(device)
        if not (topic.startswith(base) and len(topic) > len(base)) or "+" in topic or "#" in topic:
            return f"response topic must lie under {base}"
        if len(topic.encode()) > MAX_RESPONSE_TOPIC_BYTES:
            return f"response topic is longer than {MAX_RESPONSE_TOPIC_BYTES} bytes"
        return None

    def _queue(self, device: str, req: p.ChatRequest, rid: str, held: Held, digest: bytes) -> Job:
        """Journal the request and start its task (`held`: its duplicate key and where its
        terminal goes, which the group's store holds should this worker die)."""
        key = (device, rid)
        previous = self.jobs.get(key)
        s = self.settings
        if previous is None and len(self.jobs) >= s.max_streams + s.max_queue:
            raise ProtocolError(p.OVERLOADED, "the bridge is busy; try again in a few seconds", rid)
        topic, correlation = held.topic, held.correlation
        job = Job(device, rid, topic, req, digest, props=_reply_props(correlation))
        if self.journal is not None:
            job.slot = self.journal.add(topic, correlation, device, held.key)
            if job.slot < 0:
                raise ProtocolError(
                    p.OVERLOADED, "the bridge is busy; try again in a few seconds", rid
                )
        if previous is not None and previous.task is not None:
            previous.cancel_message = "superseded by a new request with the same id"
            _cancel_soon(previous.task)
        self.jobs[key] = job
        if previous is None and not self._slots.locked():
            job.starting = self._begin_start()  # it goes upstream without waiting
        job.task = asyncio.create_task(self._run(job, previous), name=f"req {device}/{rid}")
        log.info(
            "request device=%s id=%s model=%s stream=%s", device, rid,
            req.model or s.openai_model, req.stream,
            extra={"device": device, "request_id": rid},
        )  # fmt: skip
        self._each("started", job)
        return job

    def _refuse(
        self,
        device: str,
        error: ProtocolError,
        rid: str | None,
        reply_to: str | None,
        correlation: bytes | None,
    ) -> None:
        """Answer a request at once with its error (as seq 0); it leaves nothing behind."""
        rid = rid or p.new_request_id()
        log.info(
            "refused request device=%s id=%s: %s: %s", device, rid, error.code, error.message,
            extra={"device": device, "request_id": rid, "outcome": error.code},
        )  # fmt: skip
        self._each("refused", device, error)
        self._publish_terminal(
            reply_to or self.topics.res(device, rid),
            p.error_message(0, error.code, error.message, error.status),
            _reply_props(correlation),
        )

    def cancel(self, device: str, payload: bytes) -> None:
        """Stop one of this device's requests; unknown ids are ignored."""
        rid = p.parse_cancel(payload)
        job = self.jobs.get((device, rid)) if rid else None
        if job is None or job.task is None:
            log.info("cancel for unknown request device=%s id=%s", device, rid)
            return
        log.info("cancel device=%s id=%s", device, rid)
        _cancel_soon(job.task)

    # --- one request, start to terminal ---------------------------------------------------

    async def _run(self, job: Job, previous: Job | None) -> None:
        try:
            if previous is not None and previous.task is not None:
                await asyncio.wait([previous.task])
            await self._slots.acquire()
            self.active += 1
            if job.starting is None and job.rounds == 0:
                job.starting = self._begin_start()
            try:
                await self._serve(job)
            finally:
                self.active -= 1
                self._slots.release()
        except asyncio.CancelledError:
            job.error = ProtocolError(job.cancel_code, job.cancel_message)
        except ProtocolError as exc:
            job.error = exc
        except Exception:
            log.exception("internal error device=%s id=%s", job.device, job.rid)
            job.error = ProtocolError(p.INTERNAL, "internal error")
        finally:
            if job.starting is not None:
                job.starting()  # ended before its call was written (refused, cancelled...)
            self._end(job)

    def _end(self, job: Job) -> None:
        """Publish the one terminal and let everyone know (must not raise)."""
        # A job superseded by a request with its id (and another payload) leaves that
        # request's duplicate record and hold alone: they are the same keys.
        current = self.jobs.get((job.device, job.rid)) is job
        if current:
            del self.jobs[(job.device, job.rid)]
        if job.timer is not None:
            job.timer.cancel()
        error = job.error
        key = _dedup_key(job.request.id, job.digest)
        if error is not None and error.code == _ANSWERED:
            # Its one terminal went out from the leader (`_taken_for_dead`).
            job.outcome = p.INTERRUPTED
            if self.journal is not None:
                self.journal.remove(job.slot)
            self._each("finished", job)
            log.info("stopped device=%s id=%s: answered by the leader", job.device, job.rid,
                     extra={"device": job.device, "request_id": job.rid,
                            "outcome": job.outcome})  # fmt: skip
            return
        self._publish_held(job)
        if error is None:
            payload = self._done(job)
        else:
            job.outcome = error.code
            payload = p.error_message(job.seq, error.code, error.message, error.status)
            # An error ended it: the same request asked again is a new try, not a duplicate.
            if current:
                self.recent.forget(job.device, key)
        if self.journal is not None:
            self.journal.set_seq(job.slot, job.seq)
        if self.shared is not None and current:
            self.shared.unhold(self.worker, job.device, key)
        self._publish_terminal(job.topic, payload, job.props, slot=job.slot)
        self._each("finished", job)
        log.info(
            "finished device=%s id=%s outcome=%s chunks=%d seconds=%.3f", job.device, job.rid,
            job.outcome, job.seq, time.monotonic() - job.started,
            extra={"device": job.device, "request_id": job.rid, "outcome": job.outcome},
        )  # fmt: skip

    def _done(self, job: Job) -> bytes:
        fold, stream = job.fold, job.request.stream
        if fold is None:  # a plugin served the request without the chat API
            return p.done_message(job.seq, finish_reason=None, usage=job.usage,
                                  model=job.request.model or self.settings.openai_model,
                                  extra=job.terminal)  # fmt: skip
        return p.done_message(
            job.seq,
            finish_reason=fold.finish_reason,
            usage=job.reported_usage,
            model=fold.model,
            text=None if stream else fold.text,
            refusal=None if stream else fold.refusal,
            tool_calls=fold.tool_calls,
            extra=job.terminal,
        )

    async def _serve(self, job: Job) -> None:
        """Prepare, ask the API round after round while a plugin wants more, then finish.

        Returns when the reply is complete; raises ProtocolError to end it with an error.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.upstream_total_timeout
        try:
            async with asyncio.timeout_at(deadline):
                job.body = job.request.upstream_body(s.openai_model, s.include_usage)
                if self._preparers and job.starting is not None:
                    # A plugin may wait here (a camera, an upload, a session being
                    # written): that wait must not hold running streams.
                    job.starting()
                    job.starting = None
                for plugin in self._preparers:
                    await plugin.prepare(job)
                if job.body is not None and job.starting is None and job.rounds == 0:
                    job.starting = self._begin_start()
                while job.body is not None:
                    await self._round(job, job.body, deadline)
                    job.rounds += 1
                    # What the chunker holds belongs to this round: it goes out before a
                    # plugin's next round (tool calls) or its finishing (the last speech).
                    self._publish_held(job)
                    if not await self._more(job):
                        break
                for plugin in self._finishers:
                    await plugin.finishing(job)
        except TimeoutError:
            text = f"no complete reply within {s.upstream_total_timeout:g} s"
            raise ProtocolError(p.UPSTREAM_TIMEOUT, text) from None

    async def _more(self, job: Job) -> bool:
        for plugin in self._rounders:
            if await plugin.next_round(job):
                return True
        return False

    async def _round(self, job: Job, body: dict[str, Any], deadline: float) -> None:
        """One complete API reply, retrying while nothing of the request was published."""
        req = job.request
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            fold = ReplyFold(body["model"], keep_text=self._keep_text or not req.stream)
            job.fold = fold
            if req.stream and req.chunked and job.seq == 0:
                job.chunker = Chunker(req.chunk_bytes or 0, req.chunk_sentences, req.chunk_ms or 0)
            try:
                await self._attempt(job, body, fold)
            except UpstreamError as exc:
                _estimate(job, body, fold)
                wait = self._retry_wait(exc, attempt, job, deadline - loop.time())
                if wait is None:
                    raise
                attempt += 1
                log.info("retrying device=%s id=%s in %.2f s after %s",
                         job.device, job.rid, wait, exc.code)  # fmt: skip
                await asyncio.sleep(wait)
                continue
            except ProtocolError as exc:  # an error the API sent inside the stream
                _estimate(job, body, fold)
                text = self.upstream.redact(exc.message)[:DETAIL_CHARS]  # redacted, then cut
                raise ProtocolError(exc.code, text) from None
            except asyncio.CancelledError:
                _estimate(job, body, fold)
                raise
            if fold.usage is None:
                _estimate(job, body, fold)
            else:
                job.add_usage(fold.usage)
            return

    def _retry_wait(
        self, exc: UpstreamError, attempt: int, job: Job, time_left: float
    ) -> float | None:
        """Seconds to wait before another attempt, or None to give up.

        Only before the first message is published: after that the device has
        part of a reply and a second attempt would not continue it.
        """
        s = self.settings
        if not exc.retryable or job.seq > 0 or attempt >= s.upstream_retries:
            return None
        wait = min(s.upstream_retry_base * 2**attempt, s.upstream_retry_max_wait)
        if exc.retry_after is not None:
            if exc.retry_after > s.upstream_retry_max_wait:
                return None
            wait = max(wait, exc.retry_after)
        return wait if wait < time_left else None

    async def _attempt(self, job: Job, body: dict[str, Any], fold: ReplyFold) -> None:
        """One upstream call: publish pieces as they come; raise on an incomplete stream.

        A stream that breaks after its `finish_reason` is complete: the reply
        was whole, only the end of the connection (or the usage chunk) is missing.
        """
        stream = job.request.stream
        first = job.seq == 0
        sent, job.starting = job.starting, None
        try:
            async with self.upstream.stream(body, f"{job.device}-{job.rid}", sent=sent) as events:
                fold.opened = True
                async for event, data in events:
                    if fold.done:
                        continue  # read to the end of the body, so the connection is reused
                    if self._starting and not first:
                        await self._let_starts_go()
                    pieces = fold.feed(event, data)
                    if stream and pieces:
                        await self._emit(job, pieces)
                    if pieces and first:
                        # After the first chunk has left: the plugins' work (a state
                        # to publish, timings) is not in the way of the device's reply.
                        first = False
                        self._each("streaming", job)
        except UpstreamError:
            if fold.finish_reason is None:
                raise
            log.info("stream of device=%s id=%s broke after its finish_reason: complete",
                     job.device, job.rid)  # fmt: skip
        finally:
            if sent is not None:
                sent()
        if not fold.complete:
            raise UpstreamError(
                p.UPSTREAM_PROTOCOL, "the API stream ended before the reply was complete"
            )

    # --- fair start -----------------------------------------------------------------------

    def _begin_start(self) -> Callable[[], None]:
        """Count a request as starting (it may open a pause of running streams);
        the returned function ends that, once."""
        self._starting += 1
        self._no_starts.clear()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._hold_until + START_GAP:
            self._hold_until = now + START_HOLD
        done = False

        def end() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._starting -= 1
            if self._starting == 0:
                # Not at once: a start that ends and begins again in the same step
                # (around a request's preparers) wakes no paused stream.
                loop.call_soon(self._release_streams)

        return end

    def _release_streams(self) -> None:
        if self._starting == 0:
            self._no_starts.set()

    async def _let_starts_go(self) -> None:
        """Pause a running stream while requests are being started (until the current
        pause ends): their API calls go out first."""
        loop = asyncio.get_running_loop()
        while self._starting:  # again after a wake-up: another start may have begun
            left = self._hold_until - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._no_starts.wait()

    # --- where chunks leave ---------------------------------------------------------------

    async def _emit(self, job: Job, pieces: list[tuple[str, str]]) -> None:
        link = self.link
        if link.congested:
            await link.drained()
        if job.chunker is not None:
            pieces = self._chunk(job, pieces)
        if self.journal is not None:
            # Counted before publishing: after a crash the journal may be ahead of
            # what the device got (a gap), never behind it (a repeated seq).
            self.journal.set_seq(job.slot, job.seq + len(pieces))
        first = job.seq == 0
        for kind, text in pieces:
            if kind == DELTA:
                self._send_text(job, text)
            else:
                self._send(job, p.refusal_message(job.seq, text))
        if first and pieces:
            link.flush()  # the first chunk leaves at once: time to first chunk

    def _send(self, job: Job, payload: bytes) -> None:
        """Publish one message of a reply; its seq is spent even if the link refuses it.

        At QoS 0 while the broker is away the message is lost: the device then
        sees a gap in `seq`, never a silently shortened text.
        """
        try:
            self.link.publish(job.topic, payload, self.qos, properties=job.props)
        except ConnectionError as exc:
            log.warning("lost a message of device=%s id=%s: %s", job.device, job.rid, exc)
        job.seq += 1

    def _chunk(self, job: Job, pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Merge deltas as the request asked; start the clock for what is held."""
        chunker = job.chunker
        assert chunker is not None
        out: list[tuple[str, str]] = []
        for kind, text in pieces:
            if kind == DELTA:
                out.extend((DELTA, piece) for piece in chunker.feed(text))
            else:
                out.append((kind, text))
        if chunker.max_ms and chunker.holding and job.timer is None:
            loop = asyncio.get_running_loop()
            job.timer = loop.call_later(chunker.max_ms / 1000, self._flush_held, job)
        return out

    def _flush_held(self, job: Job) -> None:
        """The time rule: publish what was held for `chunk_ms`."""
        job.timer = None
        if job.task is not None and not job.task.done():
            wait = job.chunker.due_in() if job.chunker is not None else None
            if wait is not None and wait > 0.001:  # what is held now came after the timer began
                job.timer = asyncio.get_running_loop().call_later(wait, self._flush_held, job)
                return
            self._publish_held(job)

    def _publish_held(self, job: Job) -> None:
        """Publish what the chunker holds (on time, or before the terminal)."""
        if job.chunker is None or not job.chunker.holding:
            return
        held = job.chunker.flush()
        if self.journal is not None:
            self.journal.set_seq(job.slot, job.seq + len(held))
        for text in held:
            self._send_text(job, text)

    def _send_text(self, job: Job, text: str) -> None:
        """Publish a piece of reply text and hand it to the plugins that follow the text."""
        self._send(job, p.delta_message(job.seq, text))
        for plugin in self._text_plugins:
            try:
                plugin.text(job, text)
            except Exception:
                log.exception("plugin %s.text failed", type(plugin).__name__)

    def _publish_terminal(
        self, topic: str, payload: bytes, props: Properties | None = None, slot: int = -1
    ) -> None:
        """Publish a terminal message (QoS 1); while disconnected, as soon as we are back.

        The request's journal slot is freed when the broker acknowledges it.
        """
        if not self.connected:
            task = asyncio.create_task(self._publish_when_connected(topic, payload, props, slot))
            self._later.add(task)
            task.add_done_callback(self._later.discard)
            return
        journal = self.journal
        try:
            self.link.publish(
                topic, payload, qos=1, properties=props,
                on_ack=None if journal is None or slot < 0 else lambda: journal.remove(slot),
            )  # fmt: skip
        except (ConnectionError, ValueError) as exc:
            log.error("could not publish terminal on %s: %s", topic, exc)

    async def _publish_when_connected(
        self, topic: str, payload: bytes, props: Properties | None, slot: int
    ) -> None:
        await self.link.connected.wait()
        self._publish_terminal(topic, payload, props, slot)


def _held_key(job: Job) -> tuple[str, str]:
    """A job's (device, duplicate key): how the store's holds and answers name it."""
    return job.device, _dedup_key(job.request.id, job.digest)


def _dedup_key(request_id: str | None, digest: bytes) -> str:
    """A request's key in the duplicate records, the journal and the group's holds: its
    id, or its payload's digest when it has none."""
    return request_id or f"~{digest.hex()}"


def _reply_props(correlation: bytes | None) -> Properties | None:
    """The v5 properties every message of a reply carries (the request's correlation data)."""
    if correlation is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation
    return props


def _estimate(job: Job, body: dict[str, Any], fold: ReplyFold) -> None:
    """Count what an API call consumed without a `usage` to say so (the budget estimates it).

    A call the API refused or never received spent nothing.
    """
    if not fold.opened:
        return
    prompt = 0
    for message in body.get("messages", ()):
        content = message.get("content")
        if isinstance(content, str):
            prompt += len(content)
        elif isinstance(content, list):
            prompt += sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    job.estimated_chars += prompt + fold.chars


def _cancel_soon(task: asyncio.Task[None]) -> None:
    """Cancel a request's task after its first step.

    A task cancelled before it ever ran (its request and the cancel came in
    one read from the broker) never enters `_run`, so its `finally` would not
    publish the terminal. Its first step is already queued, so a `call_soon`
    lands after it.
    """
    asyncio.get_running_loop().call_soon(task.cancel)
