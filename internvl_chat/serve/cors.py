"""The CORS headers of an answer made outside Starlette's CORS middleware (serve/app.py BrowserOrigins):
the 503 past --max-connections, the 408 of a head that came too slowly, the catch-all 500. Without
them a page of an allowed origin sees only "network error", never why it was refused."""

from __future__ import annotations

# a page's script may read only the "safelisted" response headers unless the server exposes others:
# Retry-After says when to try again after a 429 or 503, a 429's retry-after-ms in milliseconds (which
# openai-node reads first)
EXPOSED = "Retry-After, retry-after-ms"


def listed(origin: str, origins: tuple[str, ...]) -> bool:
    """Whether --allow-origin lets pages of `origin` call the server (by name, or all with "*")."""
    return "*" in origins or origin in origins


def allowed_origin_headers(origin: str | None, origins: tuple[str, ...]) -> dict[str, str]:
    """The headers an answer to a page of `origin` carries when --allow-origin lists it (as the
    middleware sends them: the origin itself, or "*" when every origin is allowed); none otherwise."""
    if origin is None or not listed(origin, origins):
        return {}
    if "*" in origins:
        return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSED}
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED, "Vary": "Origin"}


def origin_in_partial_head(head: bytes) -> str | None:
    """The Origin of a request head that never ended (its complete header lines only; None when it
    has none yet, or several, which no browser sends)."""
    lines = head.split(b"\n")[1:-1]  # after the request line; the last may be cut mid-way
    values = [value.strip() for name, _, value in (line.partition(b":") for line in lines) if name.lower() == b"origin"]
    if len(values) != 1:
        return None
    return values[0].decode("latin-1")
