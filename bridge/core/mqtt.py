"""The MQTT side: a paho-mqtt client driven by the asyncio event loop.

paho does the protocol; this module gives it sockets from the event loop
(reader and writer callbacks, as in paho's own asyncio example), reconnects
with backoff, and tells publishers when to wait (back-pressure) so that no
message is dropped by a full queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core.settings import MqttUrl

log = logging.getLogger("bridge.core.mqtt")

MessageHandler = Callable[[paho.MQTTMessage], None]


_DISCONNECT = b"\xe0"
# Seconds a published message may wait to be batched with others before it is written.
MAX_WRITE_DELAY = 0.001
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


# TCP_QUICKACK exists on Linux only; elsewhere acknowledgements keep the system's timing.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class BufferedClient(paho.Client):
    """paho's client with its socket I/O batched, for a client that moves many small messages.

    paho reads a packet with three `recv` calls (type, length, body) and
    writes each packet with its own `send`. Here reads are served from one
    `recv` of up to 64 KiB, and what paho writes in one `loop_write` goes out
    in one `send`. The protocol stays paho's.

    It overrides private parts of paho 2.x (`_sock_recv`, `_sock_send`,
    `_handle_pubackcomp`, and reads `_in_packet`, `_out_messages`): the version
    is pinned below 3, and the suite runs every reply through them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        # Socket reads left to this turn of the event loop (see `read_turn`).
        self._reads_left = 1
        self._batch: bytearray | None = None
        self._unsent = b""

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """A plain success PUBACK (one for every reply chunk) without building objects.

        paho decodes each into a ReasonCode and a Properties; a success with no
        properties carries only the message id, so shared success objects go to
        the callback instead. Anything else takes paho's own path.
        """
        packet = self._in_packet["packet"]
        n = len(packet)
        if cmd == "PUBACK" and (n == 2 or (n <= 4 and not any(packet[2:]))):
            mid = (packet[0] << 8) | packet[1]
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def buffered(self) -> bool:
        """Whether read bytes wait here that the socket will not signal again."""
        return self._rpos < len(self._rbuf)

    def read_turn(self) -> None:
        """Allow one more socket read: each turn of the event loop reads at most once.

        paho's `loop_read` reads as long as the socket has data. When the broker
        delivers a burst of requests while their acknowledgements let it send
        the next, that was one callback of 50 ms for 100 requests, and none of
        them started before the last was read (docs/performance.md, "Fair start").
        """
        self._reads_left = 1

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            if self._reads_left <= 0:
                raise BlockingIOError  # paho: "nothing more now"; the loop calls again
            self._reads_left -= 1
            data = super()._sock_recv(65536)
            sock = self._sock
            if _QUICKACK is not None and isinstance(sock, socket.socket):
                # Acknowledge at once what was read. A broker with Nagle's algorithm
                # on (Mosquitto's default: `set_tcp_nodelay false`) holds its next
                # small packet (a request, a PUBACK) until our TCP acknowledges the
                # last one, and Linux delays that acknowledgement by up to 40 ms.
                # Linux turns quick acknowledgements off again by itself: set at
                # every read.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        out = self._rbuf[self._rpos : end]
        self._rpos = min(end, len(self._rbuf))
        return out

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._batch is None:
            return super()._sock_send(buf)
        self._batch += buf
        if buf[:1] == _DISCONNECT:
            # paho closes the socket as soon as this returns: send everything now.
            self._unsent += bytes(self._batch)
            self._batch = bytearray()
            self._flush()
        return len(buf)

    def write_batched(self) -> MQTTErrorCode:
        """`loop_write`, with everything it writes sent together; keeps what the kernel refuses."""
        if self._unsent and not self._flush():
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        self._batch = bytearray()
        try:
            rc = self.loop_write()
        finally:
            batch, self._batch = self._batch, None
        if batch:
            self._unsent += bytes(batch)
            self._flush()
        return rc

    def _flush(self) -> bool:
        """Send what waits; True when nothing is left."""
        try:
            sent = super()._sock_send(self._unsent)
        except BlockingIOError:
            return False
        except OSError:  # the connection is gone; paho notices on its own
            self._unsent = b""
            return True
        self._unsent = self._unsent[sent:]
        return not self._unsent

    def unsent(self) -> bool:
        return bool(self._unsent)

    def reset_buffers(self) -> None:
        self._rbuf, self._rpos, self._unsent = b"", 0, b""


@dataclass(frozen=True)
class Will:
    """The last will: what the broker publishes for us when we vanish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttLink:
    """One MQTT connection (v5, or 3.1.1) owned by an asyncio loop.

    Args:
        url: the broker.
        client_id: fixed for a persistent session, or "" for a random one.
        on_message: called in the loop for every message; must not block.
        subscriptions: (filter, qos) pairs, subscribed again at every connect.
        clean_start: False keeps the broker-side session (and queued messages).
        session_expiry: seconds the broker keeps the session after a disconnect.
        will: the last will, if any.
        on_connect: called in the loop after each successful connect.
        high_water: publishes not yet written (QoS 0) or acknowledged (QoS 1)
            beyond which `congested` is true and publishers should `await drained()`.
        manual_ack: acknowledge received QoS 1 messages only through `ack()`.
        version: 5 (MQTT v5) or 4 (MQTT 3.1.1, for brokers without v5).
        reconnect: False for a connection made once: after it ends, none is made again
            (taking over another client's session must not take it back from its owner).
    """

    def __init__(  # noqa: PLR0913  # keyword-only: one connection's options, each defaulted
        self,
        url: MqttUrl,
        *,
        client_id: str,
        on_message: MessageHandler,
        subscriptions: list[tuple[str, int]] | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        keepalive: int = 30,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        ca_file: Path | None = None,
        tls_insecure: bool = False,
        high_water: int = 4_000,
        manual_ack: bool = False,
        version: int = 5,
        reconnect: bool = True,
    ) -> None:
        self.url = url
        self._subscriptions = subscriptions or []
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._keepalive = keepalive
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._high_water = high_water
        self._reconnect = reconnect
        self._was_up = False
        self._low_water = high_water // 2
        self._pending = 0
        self._acks: dict[int, Callable[[], None]] = {}
        self._unwritten_since: float | None = None
        self._acked = False  # an acknowledgement was queued while reading
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._sock: socket.socket | None = None
        self._keep_up_task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._connect_error: str | None = None
        self._refused = asyncio.Event()

        self._v5 = version == 5
        c = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else clean_start,
        )
        if url.username:
            c.username_pw_set(
                url.username, url.password.get_secret_value() if url.password else None
            )
        if url.tls:
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if tls_insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            c.tls_set_context(ctx)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        # 0: no paho cap. With a cap, paho walks every message in flight on each
        # PUBACK; our own high-water mark bounds what is pending instead.
        c.max_inflight_messages_set(0)
        c.manual_ack_set(manual_ack)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        self._unsubscribing: dict[int, asyncio.Event] = {}
        self.client = c

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Connect (retrying with backoff) and keep the connection up until `stop()`.

        Raises:
            TimeoutError: when `timeout` is given and no connection was made in time.
        """
        self._loop = asyncio.get_running_loop()
        self._keep_up_task = asyncio.create_task(self._keep_up(), name="mqtt-keep-up")
        if timeout is not None:
            try:
                async with asyncio.timeout(timeout):
                    up = asyncio.ensure_future(self.connected.wait())
                    no = asyncio.ensure_future(self._refused.wait())
                    try:
                        await asyncio.wait([up, no], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        up.cancel()
                        no.cancel()
                    if not self.connected.is_set():
                        raise TimeoutError
            except TimeoutError:
                await self.stop()
                reason = f": {self._connect_error}" if self._connect_error else ""
                raise TimeoutError(
                    f"could not connect to {self.url.display()} within {timeout:g} s{reason}"
                ) from None

    async def stop(self, timeout: float = 2.0) -> None:
        """Flush what is queued (within `timeout`) and disconnect cleanly."""
        self._closing = True
        if self.connected.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.drained()
            self.client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._closed.wait()
        if self._keep_up_task is not None:
            self._keep_up_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keep_up_task
        self._detach()

    async def unsubscribe(self, filters: list[str], timeout: float = 2.0) -> bool:
        """Unsubscribe from `filters` (also at later reconnects); True once the broker
        has acknowledged it within `timeout`."""
        if not filters:
            return True
        self._subscriptions = [(f, q) for f, q in self._subscriptions if f not in filters]
        if not self.connected.is_set():
            return False
        rc, mid = self.client.unsubscribe(filters)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            return False
        done = self._unsubscribing[mid] = asyncio.Event()
        self.flush()
        try:
            async with asyncio.timeout(timeout):
                await done.wait()
        except TimeoutError:
            return False
        finally:
            self._unsubscribing.pop(mid, None)
        return True

    async def _keep_up(self) -> None:
        """Connect, reconnect after a loss, and run paho's periodic work (pings)."""
        backoff = 0.2
        while not self._closing:
            if self._sock is None:
                if self._was_up and not self._reconnect:
                    return
                try:
                    await self._connect()
                    backoff = 0.2
                except OSError as exc:
                    self._connect_error = str(exc) or type(exc).__name__
                    log.warning(
                        "cannot reach broker %s: %s; retrying in %.1f s",
                        self.url.display(),
                        self._connect_error,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            self.client.loop_misc()
            await asyncio.sleep(0.5)

    async def _connect(self) -> None:
        assert self._loop is not None
        props: Properties | None = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry
        # The blocking connect (TCP, TLS handshake, CONNECT packet) runs off the loop;
        # nothing else touches the client until it returns, since publishers wait
        # for `connected`.
        await self._loop.run_in_executor(
            None,
            lambda: self.client.connect(
                self.url.host,
                self.url.port,
                keepalive=self._keepalive,
                clean_start=self._clean_start if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            ),
        )
        sock = self.client.socket()
        if sock is None:
            raise ConnectionError("connection closed during connect")
        self._attach(sock)

    def _attach(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._closed.clear()
        c = self.client
        c.reset_buffers()
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._done_writing
        self._loop.add_reader(sock, self._read)
        if c.want_write():
            self._loop.add_writer(sock, self._write)

    def _want_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._write)

    def _done_writing(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        if not self.client.unsent():
            self._loop.remove_writer(sock)

    def _detach(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
        self._sock = None
        self._closed.set()
        self.client.on_socket_register_write = None
        self.client.on_socket_unregister_write = None

    def _read(self) -> None:
        c = self.client
        self._acked = False
        c.read_turn()
        while True:
            rc = c.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self._sock is not None:
                    self._lost(rc)
                return
            sock = self._sock
            if c.buffered():
                continue
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                c.read_turn()  # bytes TLS already decrypted: the socket will not signal them
                continue
            break
        if self._acked:
            # The broker sends a client at most its window (Mosquitto's
            # max_inflight_messages, 20 by default) of unacknowledged messages:
            # the acknowledgements leave now, not after the loop's next busy
            # iteration, so the next requests come at once.
            self.flush()

    def _write(self) -> None:
        c = self.client
        self._unwritten_since = None
        rc = c.write_batched()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            if self._sock is not None:
                self._lost(rc)
            return
        if not c.unsent() and not c.want_write() and self._sock is not None:
            assert self._loop is not None
            self._loop.remove_writer(self._sock)

    def _lost(self, rc: MQTTErrorCode) -> None:
        log.warning("broker connection lost: %s", paho.error_string(rc))
        self._detach()
        self._down()

    def _on_socket_close(self, _c: paho.Client, _u: Any, _sock: Any) -> None:
        self._detach()
        self._down()

    def _down(self) -> None:
        self.connected.clear()
        self.subscribed.clear()

    # --- paho callbacks -------------------------------------------------------------------

    def _on_connect(self, c: paho.Client, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._connect_error = f"broker refused the connection: {reason}"
            log.error("%s", self._connect_error)
            self._refused.set()
            return
        log.info(
            "connected to %s (session %s)",
            self.url.display(),
            "resumed" if flags.session_present else "new",
        )
        if self._subscriptions:
            c.subscribe(self._subscriptions)
        else:
            self.subscribed.set()
        # What paho still holds of the session (resent on this connection) is pending too;
        # paho keeps that table private.
        self._pending = len(c._out_messages)  # noqa: SLF001
        self._was_up = True
        self.connected.set()
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not self._closing:
            log.warning("disconnected from broker: %s", reason)
        self._down()

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        failed = [str(rc) for rc in codes if rc.is_failure]
        if failed:
            log.error("broker refused a subscription: %s", ", ".join(failed))
        self.subscribed.set()

    def _on_unsubscribe(self, _c: paho.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        done = self._unsubscribing.get(mid)
        if done is not None:
            done.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._on_message_cb(msg)
        except Exception:
            log.exception("message handler failed on %s", msg.topic)

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        self._pending -= 1
        if self._acks:
            acked = self._acks.pop(mid, None)
            if acked is not None:
                try:
                    acked()
                except Exception:
                    log.exception("acknowledgement callback failed")
        if self._pending <= self._low_water and not self._drained.is_set():
            self._drained.set()

    def flush(self) -> None:
        """Write what is queued now, rather than when the loop next runs the writer.

        A task that reads a burst of already-buffered upstream data never yields,
        so without this a reply's first chunk would leave with its last.
        """
        if self._sock is not None and (self.client.want_write() or self.client.unsent()):
            self._write()

    def ack(self, msg: paho.MQTTMessage) -> None:
        """Acknowledge a QoS 1 message (with `manual_ack`): the broker may forget it."""
        if msg.qos > 0 and self.connected.is_set():
            self.client.ack(msg.mid, msg.qos)
            self._acked = True

    # --- publishing -----------------------------------------------------------------------

    @property
    def congested(self) -> bool:
        """True while publishers should wait: disconnected, or too much unsent."""
        return not self._drained.is_set() or not self.connected.is_set()

    async def drained(self) -> None:
        """Wait until connected and the unsent backlog is below the low-water mark."""
        while not (self.connected.is_set() and self._drained.is_set()):
            await self.connected.wait()
            await self._drained.wait()

    def publish(  # noqa: PLR0913  # paho's publish(), plus the acknowledgement callback
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        *,
        on_ack: Callable[[], None] | None = None,
    ) -> None:
        """Queue a message; raise ConnectionError if paho refuses it.

        `on_ack` (QoS 1) is called once the broker has acknowledged the
        message, possibly after a reconnect (paho resends it in the session).

        Callers that publish in volume check `congested` first and await
        `drained()`: that is the back-pressure that keeps queues bounded.
        """
        info = self.client.publish(topic, payload, qos, retain, properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        ):
            self._pending += 1
            if on_ack is not None and qos > 0:
                self._acks[info.mid] = on_ack
            if self._pending >= self._high_water:
                self._drained.clear()
            # Writes wait for the loop's writer, which runs after every read and
            # task step of a busy iteration; no message waits longer than this.
            now = time.monotonic()
            if self._unwritten_since is None:
                self._unwritten_since = now
            elif now - self._unwritten_since > MAX_WRITE_DELAY:
                self.flush()
            return
        raise ConnectionError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
