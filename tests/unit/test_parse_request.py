"""`parse_request`: every way a `P/D/req` payload is refused, and the id a refusal is sent to."""

from __future__ import annotations

import json

import pytest

from bridge.core import protocol as p
from bridge.core.errors import BAD_REQUEST, TOO_LARGE, ProtocolError

LIMIT = 1024


def refusal(payload: bytes, limit: int = LIMIT) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        p.parse_request(payload, limit)
    return caught.value


def test_plain_text_is_a_prompt_without_its_surrounding_blanks() -> None:
    req = p.parse_request(b"  Why is the sky blue?\n", LIMIT)
    assert (req.prompt, req.id, req.stream) == ("Why is the sky blue?", None, True)


def test_text_that_is_not_an_object_is_a_prompt_too() -> None:
    assert p.parse_request(b'["a", 1]', LIMIT).prompt == '["a", 1]'


def test_a_payload_of_exactly_the_limit_is_taken() -> None:
    payload = json.dumps({"id": "q1", "prompt": "x" * 40}).encode()
    assert p.parse_request(payload, len(payload)).id == "q1"


def test_too_large_is_refused_before_parsing_with_the_salvaged_id() -> None:
    # Nested far beyond what the parser takes, not UTF-8: only the size is looked at.
    payload = b'{"id":"big1","messages":' + b"[" * 5000 + b"\xff"
    err = refusal(payload, limit=1000)
    assert (err.code, err.request_id) == (TOO_LARGE, "big1")
    assert f"{len(payload)} bytes, more than the 1000 allowed" in err.message


def test_not_utf8_is_refused_with_the_salvaged_id() -> None:
    err = refusal(b'{"id":"u8","prompt":"caf\xe9"}')
    assert (err.code, err.request_id) == (BAD_REQUEST, "u8")
    assert "not valid UTF-8" in err.message


@pytest.mark.parametrize("payload", [b"", b" \n\t "])
def test_an_empty_request_is_refused(payload: bytes) -> None:
    err = refusal(payload)
    assert (err.code, err.message, err.request_id) == (BAD_REQUEST, "request is empty", None)


def test_nesting_too_deep_is_refused_with_the_salvaged_id() -> None:
    payload = b'{"id":"deep","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    err = refusal(payload, limit=len(payload))
    assert (err.code, err.request_id) == (BAD_REQUEST, "deep")
    assert err.message == "request is nested too deeply"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_numbers_json_cannot_carry_are_refused(number: str) -> None:
    err = refusal(b'{"id":"n1","prompt":"x","temperature":%s}' % number.encode())
    assert (err.code, err.request_id) == (BAD_REQUEST, "n1")
    assert err.message.startswith("request is not valid JSON")


def test_a_lone_surrogate_is_refused_with_the_request_id() -> None:
    err = refusal(b'{"id":"s1","prompt":"half \\ud83d of a smiley"}')
    assert (err.code, err.request_id) == (BAD_REQUEST, "s1")
    assert "lone UTF-16 surrogate" in err.message


def test_a_surrogate_pair_is_one_character() -> None:
    assert p.parse_request(b'{"prompt":"\\ud83d\\ude00"}', LIMIT).prompt == "\U0001f600"


def test_an_unknown_field_is_named_in_the_refusal() -> None:
    err = refusal(b'{"id":"k1","prompt":"x","colour":"red"}')
    assert (err.code, err.request_id) == (BAD_REQUEST, "k1")
    assert err.message == "colour: unknown field"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": 5}, "prompt: Input should be a valid string"),
        ({"prompt": "x", "stream": "yes"}, "stream: Input should be a valid boolean"),
        ({"prompt": "x", "temperature": 3}, "temperature: Input should be less than or equal"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
        ({"id": "only"}, "give exactly one of prompt and messages"),
    ],
)
def test_a_wrong_type_or_value_is_refused_not_coerced(body: dict[str, object], words: str) -> None:
    err = refusal(json.dumps(body).encode())
    assert err.code == BAD_REQUEST
    assert words in err.message


def test_invalid_json_keeps_the_id_found_at_its_start() -> None:
    err = refusal(b'{"id":"cut7","prompt":"the payload ends here')
    assert (err.code, err.request_id) == (BAD_REQUEST, "cut7")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id":"not an id","prompt":',  # not a valid id: no topic level for the reply
        b'{"id":17,"prompt":',  # not a string
        b'{"prompt":"' + b"x" * 300 + b'","id":"late"',  # beyond the first 256 bytes
    ],
)
def test_no_id_is_salvaged_that_could_not_address_a_reply(payload: bytes) -> None:
    assert refusal(payload).request_id is None


def test_a_valid_request_with_an_invalid_id_is_refused_without_one() -> None:
    err = refusal(b'{"id":"a/b","prompt":"x"}')
    assert (err.code, err.request_id) == (BAD_REQUEST, None)
    assert err.message.startswith("id:")
