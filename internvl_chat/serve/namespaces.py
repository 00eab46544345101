"""Cache namespaces: which requests may reuse each other's cached state (vLLM's `cache_salt`).

The server's caches are shared: a KV slot's prompt prefix, image and video features, data: URL
measurements, our answers' ids. Without more, what a request finds in them tells its client about
other clients' requests, with no timing needed: `cached_tokens` says how much of a prompt matched
a slot's (a guessed "My bank PIN is 1234" keeps more than "4711" when someone sent it), and a
cached video costs nothing against the decoding limit (so a 400 or not says whether someone sent it).

So each request has a namespace, and cached state is reused only within it: every cache is keyed
by it (a slot records the namespace its tokens were cached under, media keys and the answer
memory's prompt digests include it), nothing is copied. A request without `cache_salt` is in the
shared namespace "" (as before salts existed); one with a salt in the namespace of that salt, which
only clients that know the salt share. With `[serve] shared_cache = false` each request is a
namespace of its own: no request reuses another's state, whatever salt it sends, and what only a
later request could use (features, data: URL measurements, answers) is not written at all.
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
from typing import Any

from .errors import bad_request

MAX_CACHE_SALT_CHARS = 1024  # a random token needs 32-64; the bound keeps the digest's input small
SHARED = ""  # the namespace of requests without a salt
PRIVATE = "private-"  # how a namespace of one request begins (--no-shared-cache); never a salt's digest (hex)


def check_cache_salt(salt: Any) -> None:
    """400 unless `salt` is None (no salt) or a non-empty, bounded string of printable characters."""
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise bad_request("cache_salt must be a non-empty string (requests with the same salt share cached prompts and "
                          "media); leave it out to use the server's shared cache", param="cache_salt")  # fmt: skip
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise bad_request(f"cache_salt is {len(salt):,} characters, over this server's {MAX_CACHE_SALT_CHARS:,}; send a "
                          "shorter one (a random token of 32 to 64 characters is enough)", param="cache_salt")  # fmt: skip
    odd = next((c for c in salt if not c.isprintable()), None)
    if odd is not None:  # a control character, or a format one, a space other than " ", a line separator
        kind = "control" if unicodedata.category(odd) == "Cc" else "unprintable"
        raise bad_request(f"cache_salt holds the {kind} character U+{ord(odd):04X}; send printable text, such as a "
                          "random token", param="cache_salt")  # fmt: skip


def cache_namespace(salt: str | None, shared_cache: bool = True) -> str:
    """The cache namespace of a request that sent `salt`: "" without one, else a digest of
    it (a salt of any length makes a short key); with `shared_cache` off, a new one for every request
    (its "private-" prefix is never a digest's). Checked here too, where every route's salt ends up
    (/tokenize's messages skipped the sampling checks: a salt of 5 was a 500)."""
    check_cache_salt(salt)
    if not shared_cache:
        return PRIVATE + secrets.token_hex(16)
    if salt is None:
        return SHARED
    return hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def found_again(namespace: str) -> bool:
    """Whether a later request can be of `namespace`, and so find what is cached for it: not one of a
    single request (--no-shared-cache), whose entries in the shared caches (features, data: URL
    measurements, answers) would only push out others' until evicted."""
    return not namespace.startswith(PRIVATE)
