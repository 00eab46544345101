"""The proxies the environment names (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY; NO_PROXY), which httpx
uses as other tools do: a client made with them, and lines that name the variable at fault. Shared
by the `--server` client and `serve --allow-remote-media`'s fetches."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import httpx

from .errors import UsageError

PROXY_VARIABLES = ("all_proxy", "http_proxy", "https_proxy")  # what httpx reads (urllib's getproxies), either case


def proxy_variables() -> list[tuple[str, str]]:
    """(name, value) of each proxy variable set in the environment."""
    return sorted((name, value) for name, value in os.environ.items() if name.lower() in PROXY_VARIABLES and value)


def client(**kwargs) -> httpx.Client:
    """httpx's client, which goes through the proxies that the environment names: a proxy it cannot
    use is a UsageError naming the variable, never a traceback or a line that blames the URL asked
    for. An httpx.InvalidURL or ValueError still raised is about `kwargs` (e.g. base_url)."""
    try:
        return httpx.Client(**kwargs)
    except ImportError as e:  # httpx imports socksio, an optional package, for a SOCKS proxy only
        if "socks" not in str(e).lower():
            raise
        named = [name for name, value in proxy_variables() if value.strip().lower().startswith("socks")]
        where, undo = (named[0], f"unset {named[0]}") if named else ("the system's proxy setting", "change it")
        raise UsageError(f"{where} names a SOCKS proxy, which needs the socksio package: "
                         f"pip install 'httpx[socks]', or {undo}") from None  # fmt: skip
    except (httpx.InvalidURL, ValueError):
        try:  # the same client without the environment's proxies: are the arguments at fault?
            httpx.Client(**kwargs, trust_env=False).close()
        except (httpx.InvalidURL, ValueError):
            raise  # said by the caller
        named = [name for name, value in proxy_variables() if not _usable(value)]
        where, undo = (named[0], f"fix or unset {named[0]}") if named else ("the system's proxy setting", "fix it")
        raise UsageError(f"the proxy in {where} is not a usable URL (http://, https:// or socks5://HOST:PORT); "
                         f"{undo}") from None  # fmt: skip


def check() -> None:
    """A UsageError if the environment names a proxy that httpx cannot use (at a program's start)."""
    client().close()


def proxy_of(http: httpx.Client, url: str) -> str | None:
    """The proxy that requests to `url` go through, as a line names it ("the proxy in HTTPS_PROXY");
    None when they go directly (no proxy, a host in NO_PROXY), or where httpx's private choice of
    transport is not there (another httpx)."""
    choose = getattr(http, "_transport_for_url", None)
    if choose is None or choose(httpx.URL(url)) is getattr(http, "_transport", None):
        return None
    for wanted in (urlsplit(url).scheme.lower() + "_proxy", "all_proxy"):  # httpx prefers the scheme's own
        names = [name for name, _ in proxy_variables() if name.lower() == wanted]
        if names:
            return "the proxy in " + min(names, key=str.isupper)  # urllib prefers the lower-case one
    return "the system's proxy"


def _usable(value: str) -> bool:
    """Whether httpx takes `value` as a proxy URL (a bare HOST:PORT is http://, as httpx reads it)."""
    try:
        httpx.Proxy(value if "://" in value else "http://" + value)
    except (httpx.InvalidURL, ValueError):
        return False
    return True
