# Runs on the MicroPython VM: a unit test of MQTTReply's seq handling with a
# stand-in transport whose "broker" hands out prepared messages. Prints one
# "R {json}" line per case.

import asyncio
import json
import sys

from picollm import LLMError
from picollm.mqtt import MQTTReply
from picollm.topics import Topics


class FakeTransport:
    def __init__(self, messages):
        self.cfg = {"poll_ms": 1, "reply_timeout_ms": 300}
        self.topics = Topics("llm", "dev")
        self.box = []
        self.want = None
        self.active = None
        self.pending = [json.dumps(m).encode() for m in messages]
        self.published = []
        self.tools = None  # no tools registered (picollm.tools)

    async def publish_retry(self, topic, payload):
        self.published.append(topic.decode())

    def ensure(self):
        pass

    def publish(self, topic, payload):
        self.published.append(topic.decode())

    def poll(self):
        if self.pending:
            self.box.append(self.pending.pop(0))


async def collect(messages):
    t = FakeTransport(messages)
    r = MQTTReply(t, "abc", "{}")
    got = []
    try:
        while True:
            piece = await r.next_piece()
            if piece is None:
                break
            got.append(piece)
        return {"pieces": got, "finish_reason": r.finish_reason, "published": t.published}
    except LLMError as e:
        return {"pieces": got, "error": e.code, "message": e.message, "published": t.published}


async def main():
    cases = {
        "duplicates": [
            {"seq": 0, "delta": "a"},
            {"seq": 0, "delta": "a"},
            {"seq": 1, "delta": "b"},
            {"seq": 1, "delta": "b"},
            {"seq": 2, "done": True, "finish_reason": "stop"},
        ],
        "gap": [{"seq": 0, "delta": "a"}, {"seq": 2, "delta": "c"}],
        "no_seq": [{"delta": "a"}],
        "error": [
            {"seq": 0, "delta": "a"},
            {"seq": 1, "error": {"code": "upstream_status", "message": "HTTP 429", "status": 429}},
        ],
        "silence": [{"seq": 0, "delta": "a"}],
        "whole_text": [{"seq": 0, "done": True, "finish_reason": "stop", "text": "all of it"}],
        # a bridge back from a crash: chunks lost in its memory, then `interrupted`
        "gap_interrupted": [
            {"seq": 0, "delta": "a"},
            {"seq": 3, "error": {"code": "interrupted", "message": "the bridge restarted"}},
        ],
        "interrupted_first": [{"seq": 2, "error": {"code": "interrupted", "message": "x"}}],
        # a peer answering for a worker that died on another host: seq 2**32 - 1
        "interrupted_by_peer": [
            {"seq": 0, "delta": "a"},
            {"seq": 4294967295, "error": {"code": "interrupted", "message": "peer"}},
        ],
        "interrupted_in_order": [
            {"seq": 0, "delta": "a"},
            {"seq": 1, "error": {"code": "interrupted", "message": "the bridge stopped"}},
        ],
        # any other terminal after a gap is still a protocol error
        "gap_other_error": [
            {"seq": 0, "delta": "a"},
            {"seq": 2, "error": {"code": "upstream_error", "message": "x"}},
        ],
        "gap_done": [{"seq": 0, "delta": "a"}, {"seq": 2, "done": True, "finish_reason": "stop"}],
        "gap_interrupted_not_terminal": [
            {"seq": 0, "delta": "a"},
            {"seq": 2, "delta": "c", "error": {"code": "interrupted"}},
        ],
    }
    for name, messages in cases.items():
        sys.stdout.write("R " + name + " " + json.dumps(await collect(messages)) + "\n")


asyncio.run(main())
