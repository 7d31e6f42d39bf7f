"""An upstream connection holds at most a few KiB of a reply the bridge has not read yet.

Why: with hundreds of streams, what the bridge has not yet published must wait
in the kernel's socket buffer (TCP then slows the API down), not in the
bridge's memory: asyncio reads 256 KiB a time unless told otherwise.
"""

from __future__ import annotations

import asyncio

from bridge.core.netio import READ_LIMIT, AsyncioBackend, AsyncioStream


def test_an_unread_reply_waits_in_the_kernel_not_in_the_reader() -> None:
    async def go() -> tuple[int, bytes]:
        async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"x" * 256 * 1024)  # a long reply, all sent at once
            await w.drain()
            await asyncio.sleep(5)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, AsyncioStream)
        await asyncio.sleep(0.3)  # the bridge is busy: nothing read for a while
        held = len(stream._reader._buffer)  # type: ignore[attr-defined]  # what it holds
        first = await stream.read(READ_LIMIT, timeout=5)
        await stream.aclose()
        server.close()
        return held, first

    held, first = asyncio.run(go())
    # The reader pauses the socket past twice its limit; one more read may come before.
    assert 0 < held <= 3 * READ_LIMIT
    assert first == b"x" * len(first) and len(first) > 0
