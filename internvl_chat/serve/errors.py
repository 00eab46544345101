"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from ..errors import ContextOverflowError, GenerationError, InternVLChatError
from ..files import shortened, visible

# status → OpenAI's error `type` for it
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


SHOWN_CHARS = 200  # of client-sent text quoted in an error message


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """Text the client sent, fit to quote in a message: control and bidi characters escaped
    (a client may print the message to a terminal), cut to `limit` characters."""
    return shortened(visible(text), limit)


SHOWN_DIGITS = 20  # of a client-sent integer quoted in an error message


def shown_int(number: int, grouped: bool = False) -> str:
    """An integer the client sent, fit to quote: JSON carries thousands of digits, which a refusal
    repeated whole (a message of kilobytes); a long one is cut to its first digits and its length."""
    text = f"{number:,}" if grouped else str(number)
    digits = len(str(abs(number)))
    if digits <= SHOWN_DIGITS:
        return text
    return f"{str(number)[: SHOWN_DIGITS + (number < 0)]}… (a number of {digits:,} digits)"


class APIError(Exception):
    """A failure reported to the client; `str(err)` is the message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def from_app_error(err: InternVLChatError, param: str | None = None) -> APIError:
    """The app's own errors (bad media, context overflow, non-finite logits) as API errors."""
    if isinstance(err, ContextOverflowError):
        return APIError(400, str(err), code="context_length_exceeded", param=param or "messages")
    if isinstance(err, GenerationError):
        return APIError(500, str(err), code="generation_failed")
    return APIError(400, str(err), param=param)
