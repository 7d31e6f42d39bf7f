"""httpcore's network I/O on plain asyncio streams, for the upstream client.

httpcore runs on anyio by default, which opens a cancel scope for every read
and pauses and resumes the socket transport around it. With a hundred
streams each trickling a token every 20 ms, that bookkeeping was the largest
cost of the bridge after paho's (docs/performance.md). httpcore lets a client
bring its own network backend; this is that backend on asyncio's streams.
HTTP stays httpcore's and h11's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpcore
import httpx

# Bytes a stream's reader holds before it stops reading the socket (it pauses
# at twice this): the rest waits in the kernel, so memory per stream stays small.
READ_LIMIT = 2 * 1024

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection: an asyncio StreamReader and StreamWriter."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("read timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            if timeout is None:
                await self._writer.drain()
            else:
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("write timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._writer.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle keep-alive connection that is readable was closed by the server.
            return self._reader.at_eof() or self._writer.transport.is_closing()
        key = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        return self._writer.get_extra_info(key)


def _cap_reads(writer: asyncio.StreamWriter) -> None:
    """One read of the socket takes no more than the reader holds before it pauses.

    asyncio reads 256 KiB at a time whatever the reader's limit: a whole reply
    sat in the bridge instead of in the kernel's socket buffer, for each stream.
    """
    transport = writer.transport
    if hasattr(transport, "max_size"):  # asyncio's selector transports
        transport.max_size = READ_LIMIT


def _map_connect(exc: BaseException) -> Exception:
    if isinstance(exc, TimeoutError):
        return httpcore.ConnectTimeout("connect timed out")
    return httpcore.ConnectError(str(exc) or type(exc).__name__)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens connections as asyncio streams (TCP_NODELAY is asyncio's default)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    limit=READ_LIMIT,
                )
        except (TimeoutError, OSError) as exc:
            raise _map_connect(exc) from exc
        _cap_reads(writer)
        sock: socket.socket | None = writer.get_extra_info("socket")
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=READ_LIMIT)
        except (TimeoutError, OSError) as exc:
            raise _map_connect(exc) from exc
        _cap_reads(writer)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class AsyncioTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (pooling, TLS settings, error mapping) on `AsyncioBackend`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        pool = self._pool
        if not hasattr(pool, "_network_backend"):
            raise RuntimeError("this httpcore version does not take a network backend here")
        # httpx passes no network backend down; httpcore's pool keeps it private (checked above).
        pool._network_backend = AsyncioBackend()  # noqa: SLF001


# Connections per pool of a `ShardedTransport`: httpcore's pool walks every one of
# its connections on each request and each response close, so that walk is what
# a large single pool costs per request (docs/performance.md, "Fair start").
SHARD_CONNECTIONS = 16


class _Counted(httpx.AsyncByteStream):
    """A response body that tells its shard once when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self._stream = stream
        self._done: Callable[[], None] | None = done

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()  # the body's own iterator: no layer per read

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several small connection pools behind one transport; a request goes to the least busy.

    One pool of 500 connections costs a few hundred microseconds of its own
    bookkeeping per request; pools of `SHARD_CONNECTIONS` keep that constant.
    Choosing the pool with the fewest open responses means a request never
    waits for a connection while any pool has one free.
    """

    def __init__(self, pools: list[httpx.AsyncBaseTransport]) -> None:
        if not pools:
            raise ValueError("a sharded transport needs at least one pool")
        self._shards = pools
        self._busy = [0] * len(pools)

    @classmethod
    def open(
        cls,
        max_connections: int,
        *,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = False,
        keepalive: float = 5.0,
    ) -> ShardedTransport:
        """Pools of at most `SHARD_CONNECTIONS` that hold `max_connections` together,
        each idle connection kept `keepalive` seconds.

        They share one TLS context: each context loads the CA bundle again
        (about 2 MB and 40 ms apiece).
        """
        count = max(1, -(-max_connections // SHARD_CONNECTIONS))
        per = -(-max_connections // count)
        limits = httpx.Limits(
            max_connections=per, max_keepalive_connections=per, keepalive_expiry=keepalive
        )
        context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        return cls(
            [
                AsyncioTransport(limits=limits, verify=context, trust_env=trust_env)
                for _ in range(count)
            ]
        )

    @property
    def shards(self) -> int:
        return len(self._shards)

    def busy(self) -> list[int]:
        """Open responses per pool (for tests and metrics)."""
        return list(self._busy)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        i = busy.index(min(busy))
        busy[i] += 1

        def release() -> None:  # called once: here on failure, else by `_Counted`
            busy[i] -= 1

        try:
            response = await self._shards[i].handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)  # an async transport's
        response.stream = _Counted(response.stream, release)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()
