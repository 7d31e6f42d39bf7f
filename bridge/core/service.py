"""The bridge: requests enter in `on_message`, go upstream in `_attempt`, chunks leave in `_emit`.

One asyncio task per request. Every request ends with exactly one terminal
message, published in `_run`'s `finally`, whatever happened before it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.core import protocol as p
from bridge.core.chunking import Chunker
from bridge.core.hooks import Hooks, Refusal
from bridge.core.journal import Journal
from bridge.core.mqtt import MqttLink, Will
from bridge.core.reply import DELTA, ReplyFold, StreamError
from bridge.core.settings import Settings
from bridge.core.upstream import Upstream, UpstreamError

log = logging.getLogger("bridge")

_DEDUP_MAX = 100_000


# At most 2 MB of journal (512 B a slot); requests beyond it are not journaled.
JOURNAL_SLOTS = 4096

Terminal = Callable[[int], bytes]
"""Builds a request's terminal message from the seq it will carry."""


class Job:
    """One request in flight: who asked, where its reply goes, how far it got."""

    __slots__ = (
        "cancel_code",
        "cancel_message",
        "chunker",
        "device",
        "digest",
        "fold",
        "outcome",
        "props",
        "request",
        "rid",
        "seq",
        "slot",
        "started",
        "task",
        "timer",
        "topic",
    )

    def __init__(
        self,
        device: str,
        rid: str,
        topic: str,
        request: p.ChatRequest,
        digest: bytes,
        *,
        props: Properties | None = None,
    ) -> None:
        self.device = device
        self.rid = rid
        self.topic = topic
        self.props = props
        self.fold: ReplyFold | None = None
        self.request = request
        self.digest = digest
        self.seq = 0
        self.outcome = "done"
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.cancel_code = p.CANCELLED
        self.cancel_message = "cancelled by the device"
        self.chunker: Chunker | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.slot = -1


class Bridge:
    """Serves protocol v1 between one MQTT broker and one OpenAI-compatible API.

    Args:
        settings: the configuration.
        upstream: the API client; made from the settings when not given.
        hooks: policy, state, integrations and metrics, called in order.
    """

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream | None = None,
        hooks: list[Hooks] | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks or []
        self._keep_text = any(h.needs_text for h in self.hooks)
        self.topics = p.Topics(settings.topic_prefix)
        self.upstream = upstream or Upstream(settings)
        self.qos = settings.response_qos
        self.jobs: dict[tuple[str, str], Job] = {}
        self._recent: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self._slots = asyncio.Semaphore(settings.max_streams)
        self.active = 0
        self._accepting = True
        self._later: set[asyncio.Task[None]] = set()
        self.link = MqttLink(
            settings.mqtt,
            client_id=settings.client_id,
            on_message=self.on_message,
            subscriptions=[(self.topics.req_filter, 1), (self.topics.cancel_filter, 1)]
            + [s for h in self.hooks for s in h.subscriptions()],
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
        self.journal: Journal | None = None
        if settings.journal:
            self.journal = Journal(
                settings.data_dir / f"inflight-{settings.client_id}.journal",
                min(settings.max_streams + settings.max_queue + 16, JOURNAL_SLOTS),
            )
        for hook in self.hooks:
            hook.attach(self)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, connect_timeout: float | None = None) -> None:
        """Connect to the broker and start serving."""
        await self.link.start(timeout=connect_timeout)

    async def stop(self) -> None:
        """Stop cleanly: finish what runs (within the grace), then say `offline`.

        Requests still running after `BRIDGE_SHUTDOWN_GRACE` end with
        `interrupted`; requests not yet received stay queued at the broker for
        the next start.
        """
        self._accepting = False
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
        if self.link.connected.is_set():
            self._call("stopping")
            self.link.publish(self.topics.status, b"offline", qos=1, retain=True)
        await self.link.stop()
        await self.upstream.aclose()
        if self.journal is not None:
            self.journal.close()

    def _online(self) -> None:
        self.link.publish(self.topics.status, b"online", qos=1, retain=True)
        if self.journal is not None and self.journal.pending:
            for gone in self.journal.pending:
                props = None
                if gone.correlation is not None:
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    props.CorrelationData = gone.correlation
                message = "the bridge stopped while answering; ask again"
                self.link.publish(
                    gone.topic, p.error_message(gone.seq, p.INTERRUPTED, message), 1,
                    properties=props,
                )  # fmt: skip
            log.warning(
                "sent %d interrupted terminals for requests of a previous run",
                len(self.journal.pending),
            )
            self.journal.pending = []
        self._call("connected")

    def _call(self, name: str, *args: Any) -> None:
        """Call one hook method on every hook; a failing hook is logged, never fatal."""
        for hook in self.hooks:
            try:
                getattr(hook, name)(*args)
            except Exception:
                log.exception("hook %s.%s failed", type(hook).__name__, name)

    # --- where requests enter -------------------------------------------------------------

    def on_message(self, msg: paho.MQTTMessage) -> None:
        """Dispatch one MQTT message (called in the loop, must not block or raise).

        A message is acknowledged once it is taken in hand; while the bridge
        stops it is not, so the broker keeps it for the next start.
        """
        if not self._accepting:
            return
        try:
            parsed = self.topics.parse(msg.topic)
            if parsed is None:
                if not any(h.message(msg) for h in self.hooks):
                    log.warning("ignored message on unexpected topic %r", msg.topic)
            elif not p.valid_device_id(parsed[0]):
                log.warning("ignored %s from invalid device id %r", parsed[1], parsed[0][:80])
            elif parsed[1] == "req":
                props = getattr(msg, "properties", None)
                self.submit(
                    parsed[0],
                    bytes(msg.payload),
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation=getattr(props, "CorrelationData", None),
                )
            elif parsed[1] == "cancel":
                self.cancel(parsed[0], bytes(msg.payload))
        finally:
            self.link.ack(msg)

    def submit(
        self,
        device: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> Job | None:
        """Validate a request and start it, or answer it with an error at once.

        Args:
            device: the device id from the topic.
            payload: the request as received.
            response_topic: an MQTT v5 Response Topic: the reply goes there
                (it must lie under `P/D/res/`), each message with `correlation`.
        Returns:
            the started job, or None when the request was answered or dropped.
        """
        props: Properties | None = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation is not None:
                props.CorrelationData = correlation
        req: p.ChatRequest | None = None
        refusal: tuple[str, str, str | None] | None = None
        try:
            req = p.parse_request(payload, self.settings.max_request_bytes)
        except p.BadRequest as exc:
            refusal = (exc.code, exc.message, exc.request_id)
        if response_topic is not None and not self._own_response_topic(device, response_topic):
            rid = req.id if req is not None else (refusal[2] if refusal else None)
            refusal = (
                p.BAD_REQUEST,
                f"response topic must lie under {self.topics.prefix}/{device}/res/",
                rid,
            )
            req, response_topic = None, None
        # A second delivery of the same request is dropped before anything else
        # (policy included), so it can never get a second terminal.
        known_id = req.id if req is not None else (refusal[2] if refusal else None)
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if known_id is not None:
            key = (device, known_id)
            now = time.monotonic()
            seen = self._recent.get(key)
            window = self.settings.dedup_window
            if seen is not None and seen[0] == digest and now - seen[1] < window:
                log.info("dropped duplicate delivery device=%s id=%s", device, known_id)
                return None
            self._remember(key, digest, now)
        if req is not None:
            try:
                for hook in self.hooks:
                    hook.admit(device, req, len(payload))
            except Refusal as exc:
                refusal = (exc.code, exc.message, req.id)
        if refusal is not None or req is None:
            code, message, known = refusal or (p.INTERNAL, "no request", None)
            rid = known or p.new_request_id()
            log.info(
                "refused request device=%s id=%s: %s: %s", device, rid, code, message,
                extra={"device": device, "request_id": rid, "outcome": code},
            )  # fmt: skip
            self._call("refused", device, code)
            self._publish_terminal(
                response_topic or self.topics.res(device, rid),
                p.error_message(0, code, message),
                props,
            )
            return None
        rid = req.id or p.new_request_id()
        key = (device, rid)
        topic = response_topic or self.topics.res(device, rid)
        previous = self.jobs.get(key)
        if (
            previous is None
            and len(self.jobs) >= self.settings.max_streams + self.settings.max_queue
        ):
            log.warning(
                "overloaded: refused device=%s id=%s", device, rid,
                extra={"device": device, "request_id": rid, "outcome": p.OVERLOADED},
            )  # fmt: skip
            self._call("refused", device, p.OVERLOADED)
            self._publish_terminal(
                topic,
                p.error_message(0, p.OVERLOADED, "the bridge is busy; try again in a few seconds"),
                props,
            )
            return None
        job = Job(device, rid, topic, req, digest, props=props)
        if self.journal is not None:
            job.slot = self.journal.add(topic, correlation)
        if previous is not None and previous.task is not None:
            previous.cancel_message = "superseded by a new request with the same id"
            _cancel_soon(previous.task)
        self.jobs[key] = job
        job.task = asyncio.create_task(self._run(job, previous), name=f"req {device}/{rid}")
        log.info(
            "request device=%s id=%s model=%s stream=%s",
            device,
            rid,
            req.model or self.settings.openai_model,
            req.stream,
            extra={"device": device, "request_id": rid},
        )
        self._call("started", job)
        return job

    def _own_response_topic(self, device: str, topic: str) -> bool:
        """A v5 response topic may only point at the asking device's own replies."""
        base = f"{self.topics.prefix}/{device}/res/"
        return (
            topic.startswith(base) and len(topic) > len(base) and not ("+" in topic or "#" in topic)
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

    def _remember(self, key: tuple[str, str], digest: bytes, now: float) -> None:
        recent = self._recent
        recent.pop(key, None)
        recent[key] = (digest, now)
        horizon = now - self.settings.dedup_window
        while recent:
            oldest_key, (_, t) = next(iter(recent.items()))
            if t >= horizon and len(recent) <= _DEDUP_MAX:
                break
            del recent[oldest_key]

    # --- one request, start to terminal ---------------------------------------------------

    async def _run(self, job: Job, previous: Job | None) -> None:
        terminal: Terminal | None = None
        try:
            if previous is not None and previous.task is not None:
                await asyncio.wait([previous.task])
            await self._slots.acquire()
            self.active += 1
            try:
                terminal = await self._serve(job)
            finally:
                self.active -= 1
                self._slots.release()
        except asyncio.CancelledError:
            job.outcome = job.cancel_code
            code, message = job.cancel_code, job.cancel_message
            terminal = lambda seq: p.error_message(seq, code, message)  # noqa: E731
        except Exception:
            log.exception("internal error device=%s id=%s", job.device, job.rid)
        finally:
            if terminal is None:
                job.outcome = p.INTERNAL
                terminal = lambda seq: p.error_message(seq, p.INTERNAL, "internal error")  # noqa: E731
            if self.jobs.get((job.device, job.rid)) is job:
                del self.jobs[(job.device, job.rid)]
            if job.timer is not None:
                job.timer.cancel()
            if job.chunker is not None:
                self._publish_held(job)
            self._publish_terminal(job.topic, terminal(job.seq), job.props)
            if self.journal is not None:
                self.journal.remove(job.slot)
            self._call("finished", job, job.outcome, job.fold.usage if job.fold else None)
            log.info(
                "finished device=%s id=%s outcome=%s chunks=%d seconds=%.3f",
                job.device,
                job.rid,
                job.outcome,
                job.seq,
                time.monotonic() - job.started,
                extra={"device": job.device, "request_id": job.rid, "outcome": job.outcome},
            )

    async def _serve(self, job: Job) -> Terminal:
        """Call the API (retrying while nothing was published); return how to end the reply.

        The terminal is built from the seq it gets, after any held text was published.
        """
        s = self.settings
        req = job.request
        body = req.upstream_body(s.openai_model, s.include_usage)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.upstream_total_timeout
        attempt = 0
        while True:
            fold = ReplyFold(body["model"], keep_text=self._keep_text or not req.stream)
            job.fold = fold
            if req.stream and req.chunked:
                job.chunker = Chunker(req.chunk_bytes or 0, req.chunk_sentences, req.chunk_ms or 0)
            try:
                async with asyncio.timeout_at(deadline):
                    await self._attempt(job, body, fold)
            except TimeoutError:
                job.outcome = p.UPSTREAM_TIMEOUT
                text = f"no complete reply within {s.upstream_total_timeout:g} s"
                return lambda seq: p.error_message(seq, p.UPSTREAM_TIMEOUT, text)
            except StreamError as exc:
                job.outcome = exc.code
                code, text = exc.code, self.upstream.redact(exc.message)
                return lambda seq: p.error_message(seq, code, text)
            except UpstreamError as exc:
                wait = self._retry_wait(exc, attempt, job, deadline - loop.time())
                if wait is None:
                    job.outcome = exc.code
                    error = exc
                    return lambda seq: p.error_message(seq, error.code, error.message, error.status)
                attempt += 1
                log.info(
                    "retrying device=%s id=%s in %.2f s after %s",
                    job.device,
                    job.rid,
                    wait,
                    exc.code,
                )
                await asyncio.sleep(wait)
                continue
            return lambda seq: p.done_message(
                seq,
                finish_reason=fold.finish_reason,
                usage=fold.usage,
                model=fold.model,
                text=None if req.stream else fold.text,
                refusal=None if req.stream else fold.refusal,
                tool_calls=fold.tool_calls,
            )

    def _retry_wait(
        self, exc: UpstreamError, attempt: int, job: Job, time_left: float
    ) -> float | None:
        """Seconds to wait before another attempt, or None to give up.

        Only before the first chunk is published: after that the device has
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
        """One upstream call: publish pieces as they come; raise on an incomplete stream."""
        stream = job.request.stream
        first = True
        async with self.upstream.stream(body) as events:
            async for event, data in events:
                if fold.done:
                    continue  # read to the end of the body, so the connection is reused
                pieces = fold.feed(event, data)
                if pieces and first:
                    first = False
                    self._call("streaming", job)
                if stream and pieces:
                    await self._emit(job, pieces)
        if not fold.complete:
            raise UpstreamError(
                p.UPSTREAM_PROTOCOL, "the API stream ended before the reply was complete"
            )

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
        for kind, text in pieces:
            msg = (
                p.delta_message(job.seq, text)
                if kind == DELTA
                else p.refusal_message(job.seq, text)
            )
            link.publish(job.topic, msg, self.qos, properties=job.props)
            job.seq += 1
        if job.seq == len(pieces):
            link.flush()  # the first chunk leaves at once: time to first chunk

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
            self.link.publish(
                job.topic, p.delta_message(job.seq, text), self.qos, properties=job.props
            )
            job.seq += 1

    def _publish_terminal(
        self, topic: str, payload: bytes, props: Properties | None = None
    ) -> None:
        """Publish a terminal message (QoS 1); while disconnected, as soon as we are back."""
        if not self.link.connected.is_set():
            task = asyncio.create_task(self._publish_when_connected(topic, payload, props))
            self._later.add(task)
            task.add_done_callback(self._later.discard)
            return
        try:
            self.link.publish(topic, payload, qos=1, properties=props)
        except (ConnectionError, ValueError) as exc:
            log.error("could not publish terminal on %s: %s", topic, exc)

    async def _publish_when_connected(
        self, topic: str, payload: bytes, props: Properties | None
    ) -> None:
        await self.link.connected.wait()
        self._publish_terminal(topic, payload, props)


def _cancel_soon(task: asyncio.Task[None]) -> None:
    """Cancel a request's task after its first step.

    A task cancelled before it ever ran (its request and the cancel came in
    one read from the broker) never enters `_run`, so its `finally` would not
    publish the terminal. Its first step is already queued, so a `call_soon`
    lands after it.
    """
    asyncio.get_running_loop().call_soon(task.cancel)
