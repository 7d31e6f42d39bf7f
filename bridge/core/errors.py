"""The one error type of the protocol: a code from the closed list, and words for a person.

Whatever ends a request early (a bad payload, a refusal by policy, a failed
API call, an error inside the stream, a plugin's refusal) is a
`ProtocolError`, and its terminal is built from it in one place
(`bridge.core.protocol.error_message`). Clients of the protocol raise the
same type when a reply ends with an error.
"""

from __future__ import annotations

# Error codes: the closed set documented in docs/protocol.md.
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UPSTREAM_STATUS = "upstream_status"
UPSTREAM_ERROR = "upstream_error"
UPSTREAM_TIMEOUT = "upstream_timeout"
UPSTREAM_UNREACHABLE = "upstream_unreachable"
UPSTREAM_PROTOCOL = "upstream_protocol"
CANCELLED = "cancelled"
OVERLOADED = "overloaded"
INTERRUPTED = "interrupted"
INTERNAL = "internal"
TOO_MANY_TOOL_ROUNDS = "too_many_tool_rounds"  # protocol v2, "Tools"
# Pictures (protocol v2): a camera topic the device was not given; a picture that did
# not come (no camera image within `image_wait_ms`, an upload left incomplete).
TOPIC_NOT_ALLOWED = "topic_not_allowed"
IMAGE_TIMEOUT = "image_timeout"

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ProtocolError(Exception):
    """A request that ends with an error terminal `{"code":…,"message":…}`.

    Args:
        code: a protocol error code (`bad_request`, `rate_limited`, ...).
        message: what a person reads; never holds a secret.
        request_id: the request's id when it is known (to address the reply).
        status: the upstream HTTP status, for `upstream_status`.
    """

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status = status


class UpstreamError(ProtocolError):
    """A failed API call, which the bridge may try again.

    Args:
        retry_after: seconds the API asked us to wait, if it said.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, status=status)
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again."""
        if self.code == UPSTREAM_STATUS:
            return self.status in RETRYABLE_STATUS
        return self.code in (UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE, UPSTREAM_PROTOCOL)
