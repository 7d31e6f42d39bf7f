"""Pictures on the real stack: Mosquitto with broker/'s ACL, the bridge as a process, the mock.

Camera snapshots published by a test client (as Frigate would), uploads sent
in pieces, generated pictures received in pieces and decoded back to the
mock's cells, and every refusal: a camera the device was not given, bombs,
non-images, truncated and oversized uploads, another device's topics.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from bridge.dev.mock_llm import picture, picture_cells
from bridge.plugins import imaging
from tests.harness import API_KEY, BridgeProcess, Broker, Device, bridge_env, wait_for_status
from tests.test_imaging import _png_of_size


class Client:
    """A plain paho client as some broker user: publishes, and keeps raw messages."""

    def __init__(self, broker: Broker, user: str, filters: tuple[str, ...] = ()) -> None:
        if user not in broker.users:
            broker.add_user(user)
        self.got: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}")
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message
        ready = threading.Event()
        c.on_connect = lambda *a: ready.set()
        c.on_subscribe = lambda *a: ready.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert ready.wait(5)
        for f in filters:
            ready.clear()
            c.subscribe(f, qos=1)
            assert ready.wait(5)
        self.client = c

    @classmethod
    def over(cls, device: Device, filters: tuple[str, ...]) -> Client:
        """A client riding on a test device's own connection: the broker makes the user
        name the client id, so a second login as the device would replace it."""
        self = cls.__new__(cls)
        self.got, self._cond, self.client = [], threading.Condition(), device.client
        self._filters = filters
        for f in filters:
            device.client.message_callback_add(f, self._on_message)
            device.client.subscribe(f, qos=1)
        time.sleep(0.3)  # the SUBACKs (the device's client reports them to no one here)
        return self

    _filters: tuple[str, ...] = ()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.got.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def pieces(self, topic: str, timeout: float = 10.0) -> list[tuple[int, int, int, bytes]]:
        """The pieces on `topic` up to and with its end piece."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                mine = [imaging.unpack_piece(p) for t, p in self.got if t == topic]
                if any(k == imaging.END for _, k, _, _ in mine):
                    return mine
                left = deadline - time.monotonic()
                assert left > 0, f"no end piece on {topic}; got {len(mine)} pieces"
                self._cond.wait(left)

    def close(self) -> None:
        if self.client in _SHARED:
            for f in self._filters:
                self.client.message_callback_remove(f)
                self.client.unsubscribe(f)
            return
        self.client.disconnect()
        self.client.loop_stop()


# The test devices by user name: a client as one of them uses its connection.
_DEVICES: dict[str, Device] = {}
_SHARED: list[Any] = []


@pytest.fixture
def clients(broker: Broker) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(user: str, *filters: str) -> Client:
        device = _DEVICES.get(user)
        c = Client.over(device, filters) if device is not None else Client(broker, user, filters)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def upload(sender: Client, topic: str, data: bytes, size: int = 4096, end: bool = True) -> None:
    for message in imaging.pieces(data, imaging.JPEG, size)[: None if end else -1]:
        sender.publish(topic, message)


def seen_images(mock: Any, rid_text: str) -> list[dict[str, Any]]:
    """What the mock saw of the image parts of the chat request holding `rid_text`."""
    for request in reversed(mock.requests):
        if rid_text in json.dumps(request.get("body") or "")[:100000]:
            return request.get("images", [])
    raise AssertionError(f"no request with {rid_text!r} reached the mock")


@pytest.fixture(scope="module")
def pictures_bridge(
    broker: Broker, mock_llm: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BridgeProcess, Device, Device]]:
    """One bridge for the module: its `door` device may read the front camera and upload
    up to 600 kB; `other` may read no camera."""
    prefix = "pics"
    door, other = Device(broker, "door1", prefix), Device(broker, "other1", prefix)
    _DEVICES.update({door.id: door, other.id: other})
    _SHARED.extend([door.client, other.client])
    policy = {
        "devices": {door.id: {"camera_topics": ["frigate/front/+/snapshot"],
                              "max_upload_bytes": 600_000}},
    }  # fmt: skip
    env = bridge_env(
        broker, mock_llm.base_url,
        BRIDGE_TOPIC_PREFIX=prefix,
        BRIDGE_POLICY=json.dumps(policy),
        BRIDGE_IMAGE_WAIT_MS=1500,
        BRIDGE_IMAGE_UPLOAD_TIMEOUT=1.5,
        OPENAI_IMAGE_MODEL="mock-image",
        BRIDGE_IMAGE_SIZE="512x256",
    )  # fmt: skip
    proc = BridgeProcess(tmp_path_factory.mktemp("pictures"), env).start()
    wait_for_status(broker, prefix, "online")
    yield proc, door, other
    proc.stop()
    _DEVICES.clear()
    _SHARED.clear()
    door.close()
    other.close()
    assert API_KEY not in proc.logs()


# --- pictures in: camera topics -----------------------------------------------------------


def test_retained_camera_snapshot_is_resized_and_asked_about(
    pictures_bridge: Any, clients: Callable[..., Client], mock_llm: Any
) -> None:
    _proc, door, _ = pictures_bridge
    camera = clients("frigate")
    snapshot = jpeg(picture("front door", 2592, 1944))  # 5 MP, as Frigate sends it
    camera.publish("frigate/front/person/snapshot", snapshot, retain=True)
    try:
        reply = door.ask({
            "id": "cam1",
            "prompt": "What do they carry? [mock images_max_side=768] cam1",
            "images": [{"topic": "frigate/front/person/snapshot"}],
        })  # fmt: skip
        assert reply.terminal.get("done") is True, reply.terminal
        assert reply.text == "I see 1 image."
        assert seen_images(mock_llm, "cam1") == [
            {"format": "JPEG", "width": 768, "height": 576, "media_type": "image/jpeg"}
        ]
    finally:
        camera.publish("frigate/front/person/snapshot", b"", retain=True)


def test_next_snapshot_is_awaited_else_image_timeout(
    pictures_bridge: Any, clients: Callable[..., Client], mock_llm: Any
) -> None:
    _proc, door, _ = pictures_bridge
    camera = clients("frigate")
    topic = "frigate/front/car/snapshot"
    door.send({"id": "wait1", "prompt": "A car? wait1", "images": [{"topic": topic}]})
    time.sleep(0.4)
    camera.publish(topic, jpeg(picture("car", 320, 240)))
    reply = door.wait("wait1")
    assert reply.terminal.get("done") is True, reply.terminal
    assert seen_images(mock_llm, "wait1")[0]["width"] == 320
    started = time.monotonic()
    reply = door.ask({"id": "wait2", "prompt": "Anyone?",
                      "images": [{"topic": "frigate/front/cat/snapshot"}]})  # fmt: skip
    assert reply.error_code == "image_timeout"
    assert "1500 ms" in reply.terminal["error"]["message"]
    assert 1.4 < time.monotonic() - started < 6


def test_device_is_denied_a_camera_it_was_not_given(
    pictures_bridge: Any, clients: Callable[..., Client], broker: Broker
) -> None:
    proc, door, other = pictures_bridge
    camera = clients("frigate")
    camera.publish("frigate/front/person/snapshot", jpeg(picture("x", 64, 64)), retain=True)
    try:
        for n, (device, topic) in enumerate(
            (
                (other, "frigate/front/person/snapshot"),  # a device given no camera
                (door, "frigate/back/person/snapshot"),  # a camera not in door's filters
                (door, f"{proc.prefix}/{other.id}/res/x"),  # the protocol's own topics
            )
        ):
            reply = device.ask({"id": f"deny{n}", "prompt": "Who?", "images": [{"topic": topic}]})
            assert reply.error_code == "topic_not_allowed", reply.terminal
            assert reply.terminal["seq"] == 0
        # ...and the broker does not let a device read the camera itself
        spy = clients(other.id, "frigate/#")
        time.sleep(0.3)
        assert spy.got == []
        assert broker.users[other.id]
    finally:
        camera.publish("frigate/front/person/snapshot", b"", retain=True)


# --- pictures in: uploads -------------------------------------------------------------------


def test_upload_in_pieces_is_resized_before_it_goes_upstream(
    pictures_bridge: Any, clients: Callable[..., Client], mock_llm: Any
) -> None:
    proc, door, _ = pictures_bridge
    sender = clients(door.id)
    photo = jpeg(picture("shelf", 1600, 1200), quality=95)
    # The pieces may come before the request...
    upload(sender, f"{proc.prefix}/{door.id}/upload/up1", photo)
    reply = door.ask({"id": "up1", "prompt": "What is on the shelf? up1 [mock images_max_side=768]",
                      "images": [{"upload": True}]})  # fmt: skip
    assert reply.terminal.get("done") is True, reply.terminal
    assert seen_images(mock_llm, "shelf? up1")[0]["width"] == 768
    # ...or after it, and a raw rgb565 camera frame works as well as a file
    frame = imaging.to_screen(picture("frame", 320, 240), 320, 240, imaging.RGB565)
    door.send(
        {
            "id": "up2",
            "prompt": "And this frame? up2",
            "images": [{"upload": True, "format": "rgb565", "width": 320, "height": 240}],
        }
    )
    time.sleep(0.2)
    upload(sender, f"{proc.prefix}/{door.id}/upload/up2", frame, size=1000)
    reply = door.wait("up2")
    assert reply.terminal.get("done") is True, reply.terminal
    seen = seen_images(mock_llm, "frame? up2")[0]
    assert (seen["format"], seen["width"], seen["height"]) == ("JPEG", 320, 240)


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"this is not a picture at all", "bad_request", "not an image"),
        (_png_of_size(30_000, 30_000), "bad_request", "pixels"),
        (b"\xff" * 700_000, "too_large", "600000 bytes"),
    ],
)
def test_bad_uploads_are_refused(
    pictures_bridge: Any, clients: Callable[..., Client], data: bytes, code: str, words: str
) -> None:
    proc, door, _ = pictures_bridge
    rid = f"bad{len(data)}"
    door.send({"id": rid, "prompt": "What?", "images": [{"upload": True}]})
    upload(clients(door.id), f"{proc.prefix}/{door.id}/upload/{rid}", data, size=65536)
    reply = door.wait(rid)
    assert reply.error_code == code, reply.terminal
    assert words in reply.terminal["error"]["message"]


def test_truncated_upload_times_out(pictures_bridge: Any, clients: Callable[..., Client]) -> None:
    proc, door, _ = pictures_bridge
    photo = jpeg(picture("cut", 640, 480))
    door.send({"id": "cut1", "prompt": "What?", "images": [{"upload": True}]})
    upload(clients(door.id), f"{proc.prefix}/{door.id}/upload/cut1", photo, 1024, end=False)
    reply = door.wait("cut1")
    assert reply.error_code == "image_timeout"
    assert "no end" in reply.terminal["error"]["message"]


def test_a_device_cannot_upload_for_another_nor_read_or_forge_its_pictures(
    pictures_bridge: Any, clients: Callable[..., Client]
) -> None:
    proc, door, other = pictures_bridge
    base = f"{proc.prefix}/{door.id}"
    spy = clients(other.id, f"{base}/upload/#", f"{base}/image/#")
    screen = clients(door.id, f"{base}/image/+")
    # other writes a picture on door's upload topic: the broker drops it
    upload(clients(other.id), f"{base}/upload/own1", jpeg(picture("x", 64, 64)))
    reply = door.ask({"id": "own1", "prompt": "Mine?", "images": [{"upload": True}]})
    assert reply.error_code == "image_timeout"
    assert "(nothing)" in reply.terminal["error"]["message"]
    # door's own upload works, and other reads none of it
    upload(screen, f"{base}/upload/own2", jpeg(picture("y", 64, 64)))
    reply = door.ask({"id": "own2", "prompt": "Mine now?", "images": [{"upload": True}]})
    assert reply.terminal.get("done") is True, reply.terminal
    # other cannot forge pieces on door's picture topic; door's own device cannot either
    forged = imaging.pieces(b"\xff" * 16, imaging.MONO1, 16)
    for sender in (clients(other.id), screen):
        for message in forged:
            sender.publish(f"{base}/image/forged", message)
    time.sleep(0.3)
    assert spy.got == []
    assert [t for t, _ in screen.got if t.endswith("/forged")] == []


# --- pictures out --------------------------------------------------------------------------


def _cells_at_centres(width: int, height: int, prompt: str) -> list[tuple[int, int, Any]]:
    """Each cell's centre in a screen of this size, for the 512x256 picture cropped to it."""
    cells = picture_cells(prompt)
    n = len(cells)
    # 512x256 cropped to 2:1 is itself; cells are 64x32 source pixels
    return [
        ((2 * c + 1) * width // (2 * n), (2 * r + 1) * height // (2 * n), cells[r][c])
        for r in range(n)
        for c in range(n)
    ]


@pytest.mark.parametrize("fmt", ["mono1", "rgb565", "mono1_vlsb", "rgb565_be", "gray4"])
def test_generated_picture_arrives_in_pieces_in_the_screens_format(
    pictures_bridge: Any, clients: Callable[..., Client], mock_llm: Any, fmt: str
) -> None:
    proc, door, _ = pictures_bridge
    rid = f"gen{fmt.replace('_', '')}"
    screen = clients(door.id, f"{proc.prefix}/{door.id}/image/+")
    prompt = f"a cat in a hat {fmt}"
    reply = door.ask(
        {
            "id": rid,
            "image": {
                "prompt": prompt,
                "width": 128,
                "height": 64,
                "format": fmt,
                "piece_bytes": 500,
            },
        }
    )
    assert reply.terminal.get("done") is True, reply.terminal
    size = imaging.screen_size(128, 64, fmt)
    assert reply.terminal["image"] == {"width": 128, "height": 64, "format": fmt,
                                       "bytes": size, "pieces": -(-size // 500) + 1}  # fmt: skip
    assert reply.terminal["model"] == "mock-image"
    pieces = screen.pieces(f"{proc.prefix}/{door.id}/image/{rid}")
    assert [s for s, *_ in pieces] == list(range(len(pieces)))
    assert all(f == imaging.FORMAT_CODES[fmt] for _, _, f, _ in pieces)
    assert all(len(d) <= 500 for *_, d in pieces)
    data = b"".join(d for _, k, _, d in pieces if k == imaging.DATA)
    assert len(data) == size
    assert json.loads(pieces[-1][3]) == reply.terminal["image"]  # the end piece's summary
    back = imaging.from_screen(data, 128, 64, fmt)
    for x, y, colour in _cells_at_centres(128, 64, prompt):
        got = back.getpixel((x, y))
        if fmt in ("rgb565", "rgb565_be"):
            assert got == colour, (x, y)
        elif fmt == "gray4":
            luma = round(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
            assert abs(got[0] - luma) <= 17, (x, y, got, colour)
        elif colour in ((0, 0, 0), (255, 255, 255)):
            assert got == colour, (x, y)
    request = [r for r in mock_llm.requests if r["path"].endswith("/images/generations")][-1]
    assert request["body"] == {"model": "mock-image", "prompt": prompt, "size": "512x256", "n": 1}


def test_generation_errors_end_the_request_without_pieces(
    pictures_bridge: Any, clients: Callable[..., Client]
) -> None:
    proc, door, other = pictures_bridge
    screen = clients(door.id, f"{proc.prefix}/{door.id}/image/+")
    spy = clients(other.id, f"{proc.prefix}/{door.id}/image/+")
    reply = door.ask({"id": "genbad", "image": {"prompt": "x [mock status=400]", "width": 8,
                                                "height": 8, "format": "png"}})  # fmt: skip
    assert reply.error_code == "upstream_status"
    assert reply.terminal["error"]["status"] == 400
    reply = door.ask({"id": "genok", "image": {"prompt": "y", "width": 8, "height": 8,
                                               "format": "png"}})  # fmt: skip
    pieces = screen.pieces(f"{proc.prefix}/{door.id}/image/genok")
    png = b"".join(d for _, k, _, d in pieces if k == imaging.DATA)
    assert Image.open(io.BytesIO(png)).size == (8, 8)
    assert not [t for t, _ in screen.got if t.endswith("/genbad")]
    assert spy.got == []  # another device never reads door's pictures
    for n, bad in enumerate(({"format": "bmp"}, {"width": 0}, {"prompt": ""})):
        spec = {"prompt": "z", "width": 8, "height": 8, "format": "png", **bad}
        reply = door.ask({"id": f"genwrong{n}", "image": spec})
        assert reply.error_code == "bad_request", bad
    reply = door.ask(
        {
            "id": "genmix",
            "prompt": "hi",
            "image": {"prompt": "z", "width": 8, "height": 8, "format": "png"},
        }
    )
    assert reply.error_code == "bad_request"


def test_inline_images_are_re_encoded_and_non_images_refused(
    pictures_bridge: Any, mock_llm: Any
) -> None:
    _proc, door, _ = pictures_bridge
    big = imaging.data_uri(jpeg(picture("inline", 2000, 1000)))
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "inline1 [mock images_max_side=768]"},
        {"type": "image_url", "image_url": {"url": big}},
        {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ]}]  # fmt: skip
    reply = door.ask({"id": "inl1", "messages": messages})
    assert reply.terminal.get("done") is True, reply.terminal
    assert seen_images(mock_llm, "inline1")[0]["width"] == 768
    body = next(
        r["body"] for r in reversed(mock_llm.requests) if "inline1" in json.dumps(r["body"])
    )
    assert body["messages"][0]["content"][2:] == messages[0]["content"][2:]  # video, audio as sent
    messages[0]["content"][1] = {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="},
    }
    reply = door.ask({"id": "inl2", "messages": messages})
    assert reply.error_code == "bad_request"


# --- the demo ------------------------------------------------------------------------------


def test_demo_image_writes_the_devices_picture_to_a_png(tmp_path: Any) -> None:
    from tests.test_cli import llm_bridge

    result = llm_bridge(
        "demo", "--image", "a lighthouse", "--image-format", "mono1_vlsb",
        "--image-size", "128x64", "--image-out", "seen.png", cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "seen.png"
    assert f"converted back: {out}" in result.stderr
    assert "received 1024 bytes in 2 pieces (mono1_vlsb)" in result.stderr
    seen = Image.open(out).convert("RGB")
    assert seen.size == (128, 64)
    # the mock's 1024x1024 picture cropped to 2:1 keeps its middle four rows of cells
    cells = picture_cells("a lighthouse")
    for r in range(2, 6):
        for c in range(8):
            colour = cells[r][c]
            if colour in ((0, 0, 0), (255, 255, 255)):
                assert seen.getpixel((16 * c + 8, 16 * (r - 2) + 8)) == colour


def test_home_assistant_frigate_automation_asks_about_the_snapshot(
    pictures_bridge: Any, clients: Callable[..., Client], mock_llm: Any
) -> None:
    """docs/integrations/homeassistant-frigate.yaml's request, as HA's automation user sends it."""
    import ast
    from pathlib import Path

    import yaml

    proc, door, _ = pictures_bridge
    doc = Path(__file__).resolve().parent.parent / "docs/integrations/homeassistant-frigate.yaml"
    auto = yaml.safe_load(doc.read_text())
    assert auto["triggers"][0] == {"trigger": "mqtt", "topic": "frigate/events"}
    publish = auto["actions"][0]["data"]
    assert publish["topic"] == "llm/doorbell/ask"
    template = " ".join(publish["payload"].split())
    assert template.startswith("{{ {") and template.endswith("} | to_json }}")
    request = ast.literal_eval(template[3 : -len(" | to_json }}")])  # the Jinja dict literal
    assert request["images"] == [{"topic": "frigate/front_door/person/snapshot"}]
    # The same request for this test's door device and camera, with an id to wait on.
    request["images"] = [{"topic": "frigate/front/person/snapshot"}]
    request["id"] = "frigate1"
    camera = clients("frigate")
    camera.publish(
        "frigate/front/person/snapshot", jpeg(picture("visitor", 1280, 720)), retain=True
    )
    try:
        clients("automation").publish(f"{proc.prefix}/{door.id}/ask", json.dumps(request).encode())
        reply = door.wait("frigate1")
        assert reply.text == "I see 1 image."
        assert seen_images(mock_llm, "carrying")[-1]["width"] == 768
    finally:
        camera.publish("frigate/front/person/snapshot", b"", retain=True)
