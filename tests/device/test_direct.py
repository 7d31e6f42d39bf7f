"""Direct mode on the MicroPython VM: the device calls the mock LLM itself over HTTPS.

The mock serves a certificate from a CA made by the test; the device must
accept it with that CA and refuse it with another CA or for another name.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bridge.dev.mock_llm import REFUSAL_TEXT, reply_tokens
from tests.device import vmkit
from tests.device.conftest import API_KEY, server_context


def _text(prompt: str, tokens: int | None = None, images: int = 0) -> str:
    return "".join(reply_tokens(prompt, tokens, images=images))


def direct_config(base_url: str, ca: Path | None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "mode": "direct",
        "model": "mock-1",
        "api_key": API_KEY,
        "base_url": base_url,
        "ca": str(ca) if ca else None,
        "reply_timeout_ms": 5000,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def uopenai_run(
    tls_mock: Any, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """uopenai's step program, run once on the VM; its records by name."""
    folder = tmp_path_factory.mktemp("uopenai")
    image = folder / "test_4kb.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3512))
    proc = vmkit.run_vm(
        vmkit.PROGRAMS_DIR / "uopenai_steps.py",
        tls_mock.base_url,
        API_KEY,
        str(certs["ca"]),
        str(image),
        cwd=folder,
        timeout=60,
    )
    records = {
        line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2])
        for line in proc.stdout.splitlines()
        if line.startswith("R ")
    }
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert API_KEY not in proc.stdout + proc.stderr
    records["_image"] = image
    records["_requests"] = list(tls_mock.requests)
    return records


def test_init_and_argument_checks(uopenai_run: dict[str, Any], tls_mock: Any) -> None:
    r = uopenai_run["init"]
    assert r["base_url"] == tls_mock.base_url
    assert r["repr_has_key"] is False
    assert r["key_int"] == "TypeError"
    assert r["key_empty"] == "ValueError"
    assert r["url_int"] == "TypeError"
    assert r["url_scheme"] == "ValueError"
    assert r["url_nohost"] == "ValueError"
    assert r["ca_int"] == "TypeError"
    assert uopenai_run["slash"]["base_url"] == tls_mock.base_url


def test_create_argument_checks(uopenai_run: dict[str, Any]) -> None:
    assert uopenai_run["create_args"] == {
        "model_int": "TypeError",
        "model_empty": "ValueError",
        "messages_str": "TypeError",
        "messages_empty": "ValueError",
        "message_not_dict": "TypeError",
        "role_bad": "ValueError",
        "content_int": "TypeError",
        "stream_str": "TypeError",
        "timeout_zero": "ValueError",
        "timeout_str": "TypeError",
        "temperature_high": "ValueError",
        "temperature_str": "TypeError",
        "max_tokens_zero": "ValueError",
        "max_tokens_float": "TypeError",
    }
    encode = uopenai_run["encode"]
    assert (encode["int"], encode["empty"], encode["missing"]) == (
        "TypeError",
        "ValueError",
        "OSError",
    )


def test_non_stream_reply_object(uopenai_run: dict[str, Any]) -> None:
    r = uopenai_run["single"]
    assert r["content"] == _text("Reply OK")
    assert r["finish_reason"] == "stop"
    assert r["role"] == "assistant"
    assert r["id"].startswith("chatcmpl-")
    assert r["model"] == "mock-1"
    assert r["usage"]["completion_tokens"] == len(reply_tokens("Reply OK"))
    assert uopenai_run["multi"]["content"] == _text("Again")
    long = uopenai_run["long"]
    assert long["length"] == len(_text("Long [mock tokens=600]", 600))
    assert long["usage"]["completion_tokens"] == 600


def test_params_are_forwarded(uopenai_run: dict[str, Any]) -> None:
    sent = [
        r["body"]
        for r in uopenai_run["_requests"]
        if isinstance(r.get("body"), dict)
        and r["body"]["messages"][-1]["content"] == "Short please"
    ]
    assert sent and sent[0]["temperature"] == 0.2 and sent[0]["max_tokens"] == 3
    assert sent[0]["stream"] is False
    assert uopenai_run["params"]["content"] == _text("Short please", 3)


def test_requests_carry_the_key_and_multi_turn(uopenai_run: dict[str, Any]) -> None:
    requests = [r for r in uopenai_run["_requests"] if isinstance(r.get("body"), dict)]
    assert requests
    assert all(
        r["headers"].get("authorization") in (f"Bearer {API_KEY}", "Bearer sk-wrong")
        for r in requests
    )
    multi = next(r["body"] for r in requests if r["body"]["messages"][-1]["content"] == "Again")
    assert [m["role"] for m in multi["messages"]] == ["system", "user", "assistant", "user"]


def test_stream_iter_lines_and_pieces(uopenai_run: dict[str, Any]) -> None:
    r = uopenai_run["stream_lines"]
    expected = _text("Count to five")
    assert r["text"] == expected
    # role chunk + one per token + the finish chunk + [DONE]
    assert r["lines"] >= len(reply_tokens("Count to five")) + 2
    s = uopenai_run["long_stream"]
    assert s["length"] == len(_text("Long [mock tokens=600]", 600))
    assert s["pieces"] == 600
    assert s["finish_reason"] == "stop"
    assert s["usage"]["completion_tokens"] == 600
    assert s["id"].startswith("chatcmpl-") and s["model"] == "mock-1"


def test_encode_image_and_vision(uopenai_run: dict[str, Any]) -> None:
    image: Path = uopenai_run["_image"]
    assert uopenai_run["encode"]["b64"] == base64.b64encode(image.read_bytes()).decode()
    assert uopenai_run["vision"]["content"] == _text("What is this?", images=1)
    assert uopenai_run["vision"]["content"].startswith("I see 1 image.")
    sent = next(
        r["body"]
        for r in uopenai_run["_requests"]
        if isinstance(r.get("body"), dict) and isinstance(r["body"]["messages"][0]["content"], list)
    )
    url = sent["messages"][0]["content"][1]["image_url"]["url"]
    assert url == "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()


def test_null_content_becomes_empty(uopenai_run: dict[str, Any]) -> None:
    r = uopenai_run["null_content"]
    assert r["content"] == ""
    assert r["refusal"] == REFUSAL_TEXT
    assert r["has"] == [True, True, True, True]


def test_errors_and_timeouts(uopenai_run: dict[str, Any]) -> None:
    assert uopenai_run["status"]["code"] == "upstream_status"
    assert uopenai_run["status"]["status"] == 429
    assert uopenai_run["status_stream"]["status"] == 503
    assert uopenai_run["hang"]["error"] == "LLMTimeout"
    assert uopenai_run["slow_headers"]["error"] == "LLMTimeout"
    assert uopenai_run["error_event"]["code"] == "upstream_error"
    assert uopenai_run["error_event"]["pieces"] == 3
    # A stream cut short over TLS: the VM's ssl layer may not report the
    # peer's close at once, so the idle timeout may be what ends it.
    assert uopenai_run["cut"]["code"] in ("upstream_protocol", "timeout")
    assert uopenai_run["cut"]["pieces"] == 3
    assert uopenai_run["bad_key"]["status"] == 401
    assert API_KEY not in json.dumps(uopenai_run["bad_key"])


# ------------------------------------------------------------------ the Chat facade


def test_chat_facade_direct_stream_ask_history(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = direct_config(tls_mock.base_url, certs["ca"], system="Be brief.", history=2)
    tls_mock.server.clear_requests()
    recs = vmkit.run_job(
        tmp_path,
        cfg,
        [
            {"op": "stream", "prompt": "Why is the sky blue?"},
            {"op": "ask", "prompt": "And at night? [mock tokens=12]"},
            {"op": "stream", "prompt": "No [mock refusal=1]"},
        ],
    )
    first, second, third = recs
    assert first["ok"] and first["text"] == _text("Why is the sky blue?")
    assert first["pieces"] == len(reply_tokens("Why is the sky blue?"))
    assert first["finish_reason"] == "stop" and first["usage"]["total_tokens"] > 0
    assert second["ok"] and second["text"] == _text("And at night?", 12)
    assert third["refusal"] is True and third["text"] == REFUSAL_TEXT
    bodies = [r["body"] for r in tls_mock.requests if isinstance(r.get("body"), dict)]
    assert bodies[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    # the second request carries the first turn as history
    assert [m["role"] for m in bodies[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert bodies[1]["messages"][2]["content"] == _text("Why is the sky blue?")
    assert bodies[0]["stream"] is True and bodies[0]["model"] == "mock-1"


def test_chat_facade_direct_cancel(tls_mock: Any, certs: dict[str, Path], tmp_path: Path) -> None:
    cfg = direct_config(tls_mock.base_url, certs["ca"])
    (rec,) = vmkit.run_job(
        tmp_path,
        cfg,
        [{"op": "stream", "prompt": "x [mock tokens=400 delay_ms=20]", "cancel_after": 3}],
    )
    assert rec["cancelled"] is True
    assert rec["pieces"] == 3


def test_long_stream_in_a_heap_smaller_than_the_reply(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    # compiled library, a 32 KB reply, a 72 KB heap with about 52 KB live
    mpy = vmkit.compile_mpy(tmp_path / "mpy")
    (rec,) = vmkit.run_job(
        tmp_path,
        direct_config(tls_mock.base_url, certs["ca"], history=0),
        [{"op": "stream", "prompt": "x [mock tokens=5300]", "keep_text": False}],
        heapsize="72K",
        env=vmkit.mpy_env(mpy),
        timeout=60,
    )
    assert rec["ok"], rec
    assert rec["length"] >= 32768
    assert rec["sha256"] == vmkit.sha256_text(_text("x", 5300))


def test_plain_http_cut_and_error(mock_llm: Any, tmp_path: Path) -> None:
    from tests.harness import API_KEY as HARNESS_KEY

    cfg = direct_config(mock_llm.base_url, None, api_key=HARNESS_KEY)
    cut, status, fine = vmkit.run_job(
        tmp_path,
        cfg,
        [
            {"op": "stream", "prompt": "x [mock tokens=20 cut_after=3]"},
            {"op": "ask", "prompt": "x [mock status=500]"},
            {"op": "ask", "prompt": "plain http"},
        ],
    )
    assert cut["ok"] is False and cut["code"] == "upstream_protocol" and cut["pieces"] == 3
    assert status["code"] == "upstream_status" and status["status"] == 500
    assert fine["ok"] and fine["text"] == _text("plain http")


# ------------------------------------------------------------------ certificate checks


def _tls_failure(rec: dict[str, Any]) -> None:
    assert rec["ok"] is False, rec
    assert rec["code"] == "tls", rec
    assert rec["pieces"] == 0


def test_wrong_ca_is_refused(tls_mock: Any, certs: dict[str, Path], tmp_path: Path) -> None:
    before = len(tls_mock.requests)
    (rec,) = vmkit.run_job(
        tmp_path,
        direct_config(tls_mock.base_url, certs["other_ca"]),
        [{"op": "stream", "prompt": "hello"}],
    )
    _tls_failure(rec)
    assert "not correctly signed" in rec["message"]
    assert len(tls_mock.requests) == before  # nothing reached the API


def test_wrong_hostname_is_refused(certs: dict[str, Path], tmp_path: Path) -> None:
    from bridge.dev.mock_llm import running_mock

    ctx = server_context(certs["wronghost_cert"], certs["wronghost_key"])
    with running_mock(ssl_context=ctx, api_key=API_KEY) as mock:
        url = mock.base_url.replace("127.0.0.1", "localhost")
        (rec,) = vmkit.run_job(
            tmp_path, direct_config(url, certs["ca"]), [{"op": "stream", "prompt": "hello"}]
        )
        _tls_failure(rec)
        assert "CN" in rec["message"]
        assert mock.requests == []
        # the explicit opt-out skips the check
        (rec,) = vmkit.run_job(
            tmp_path,
            direct_config(url, None, tls_verify=False),
            [{"op": "ask", "prompt": "hello"}],
        )
        assert rec["ok"] and rec["text"] == _text("hello")


def test_verification_is_the_default(tls_mock: Any, tmp_path: Path) -> None:
    (rec,) = vmkit.run_job(
        tmp_path, direct_config(tls_mock.base_url, None), [{"op": "ask", "prompt": "hello"}]
    )
    assert rec["ok"] is False and rec["code"] == "tls"
    assert "CA" in rec["message"]


def test_ca_bundle_with_several_certificates(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(certs["other_ca"].read_bytes() + certs["ca"].read_bytes())
    (rec,) = vmkit.run_job(
        tmp_path, direct_config(tls_mock.base_url, bundle), [{"op": "ask", "prompt": "hello"}]
    )
    assert rec["ok"], rec
    assert rec["text"] == _text("hello")


def test_the_client_module_stands_alone(tmp_path: Path) -> None:
    """picollm.openai is the uopenai-compatible client only: importing it loads no
    transport (only the HTTP exchange it speaks, picollm.http), and Chat's direct
    transport lives in picollm.direct."""
    script = tmp_path / "alone.py"
    script.write_text(
        "import sys\n"
        "import picollm.openai\n"
        "print(sorted(k for k in sys.modules if k.startswith('picollm')))\n"
        "print(hasattr(picollm.openai, 'DirectTransport'))\n"
        "import picollm.direct\n"
        "print(picollm.direct.DirectTransport.__name__)\n"
    )
    proc = vmkit.run_vm(script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:3] == [
        "['picollm', 'picollm.http', 'picollm.openai']",
        "False",
        "DirectTransport",
    ]
