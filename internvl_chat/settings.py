"""Every user-tunable default, and where each value came from.

Layers, lowest first: the package's `configs/default.toml` < the user file
(`~/.config/internvl-chat/config.toml`, `$INTERNVL_CHAT_CONFIG`, or `--config FILE`) <
environment variables `INTERNVL_CHAT_<SECTION>_<KEY>` < command-line flags (a dict of overrides).
`/set KEY VALUE` in the REPL changes a value afterwards through `Settings.set`.

Values are parsed and validated by the type and rule of their dataclass field, so a bad value
is reported once, by name, with where it came from; nothing downstream re-validates.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from .errors import InternVLChatError, UsageError
from .files import (NoHomeFolder, brief_repr, escape_hidden, expand_home, read_text_file, refuse_web_address,
                    shortened, typed_as_utf8, undecodable_byte, visible, xdg_dir)
from .numbers import OtherDigits, ascii_shown, other_digits, parse_float, parse_int

DEFAULT_CONFIG_FILE = Path(__file__).parent / "configs" / "default.toml"
ENV_PREFIX = "INTERNVL_CHAT_"
# Not a setting: names the user config file (like --config).
ENV_CONFIG_FILE = "INTERNVL_CHAT_CONFIG"
# variables with the prefix that are not settings: the config file, and media/video.py's backend switch
OTHER_ENV_VARS = (ENV_CONFIG_FILE, "INTERNVL_CHAT_VIDEO_BACKEND")

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
INT4_BACKENDS = ("auto", "torch", "dequant", "triton", "gemlite")
COMPILE_MODES = ("auto", "on", "off")
COLORS = ("auto", "always", "never")
# chat/dialects.py DIALECTS, plus "auto" (detected from the server's model list)
REMOTE_DIALECTS = ("auto", "lmdeploy", "vllm", "sglang", "llamacpp", "ollama", "internvl-chat", "generic")
OPENAI_API_KEY_ENV = "OPENAI_API_KEY"
SECRET_KEYS = ("remote.api_key", "serve.api_key")  # never printed, never saved with a session
URL_KEYS = ("remote.server",)  # printed and saved without the user:password@ a URL may hold

# Short names accepted by `/set`; every dotted key ("generation.seed") is accepted too.
SET_ALIASES = {
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "top_k": "generation.top_k",
    "repetition_penalty": "generation.repetition_penalty",
    "max_new_tokens": "generation.max_new_tokens",
    "seed": "generation.seed",
    "stream_interval": "generation.stream_interval",
    "max_tiles": "media.max_tiles",
    "frames": "media.frames",
    "auto_attach": "media.auto_attach",
    "stats": "ui.stats",
    "markdown": "ui.markdown",
    "plain": "ui.plain",
}

# Ranges: what the generator accepts (torch's manual_seed takes [-2**63, 2**64); we document the
# non-negative half) and what keeps the arithmetic finite (a temperature or repetition penalty
# near 0 divides the logits into inf). Sizes stay far below anything an allocator would refuse.
SEED_MAX = 2**63 - 1
TEMPERATURE_MAX = 100.0
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0  # 1e-40 would divide logits into inf
MAX_TILES = 64
MAX_FRAMES = 256
MAX_RANGE_SECONDS = 1e7  # a video's time range (/video --range, --video-range, session files) ends before ~4 months
MAX_TOKENS = 1 << 20  # max_context, max_new_tokens
TIMEOUT_MAX = 3600.0  # serve's timeouts: an hour is already far past any client's patience
# the wait for a server's answer: a day is past any answer, and a socket refuses a timeout beyond
# ~292 years (1e12 s ended the first request with an OverflowError traceback)
REMOTE_TIMEOUT_MAX = 86_400.0
# and at least a millisecond: a subnormal such as 1e-320 passed "> 0" and failed every request at once
REMOTE_TIMEOUT_MIN = 0.001

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null"}


# --- field rules -------------------------------------------------------------------------------

Check = Callable[[Any], Any]  # returns the (normalised) value or raises ValueError(expectation)


def _rule(check: Check | None, expect: str) -> dict[str, Any]:
    return {"check": check, "expect": expect}


def _number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    def check(value: Any) -> Any:
        if low is not None and (value < low or (low_open and value == low)):
            raise ValueError
        if high is not None and value > high:
            raise ValueError
        return value

    return check


def _greedy_or(low: float, high: float) -> Check:
    """0 (off), or a number in [low, high]."""
    in_range = _number(low, high)

    def check(value: Any) -> Any:
        return value if value == 0 else in_range(value)

    return check


def _choice(choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Check:
    def check(value: str) -> str:
        value = value.strip().lower()
        value = (aliases or {}).get(value, value)
        if value not in choices:
            raise ValueError
        return value

    return check


def _device(value: str) -> str:
    value = value.strip().lower()
    if refused := other_digits(value):  # `cuda:١` matched \d and reached torch
        raise Refused(f"{refused}, e.g. cuda:0")
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", value):
        return value
    raise ValueError


def _bearer_token(value: str) -> str:
    # an HTTP header carries ASCII: clients cannot send any other key (the openai package refuses
    # to), and the server reads header bytes as Latin-1, so a UTF-8 key would never match
    if value and not (value.isascii() and value.isprintable() and value == value.strip()):
        raise ValueError
    return value


class Refused(ValueError):
    """A check's own words for what is wrong with a value and what to write instead (a setting
    whose rule is too long to say in one `expect`); the message says them in place of `expect`."""


WEB_SCHEMES = {"http": 80, "https": 443}  # and the port a browser leaves out of an Origin header
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\]")
ORIGIN_EXAMPLE = "http://localhost:3000"


def web_origin(text: str) -> str:
    """`text` as the Origin header a browser sends (`http://localhost:3000`: scheme and host in
    lower case, no default port), or `*`; Refused, saying what to write, when it is no origin."""
    if text == "*":
        return text
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise Refused(f"{brief_repr(text, 60)} is not an origin: write one without spaces or control characters, e.g. "
                      f"{ORIGIN_EXAMPLE}")  # fmt: skip
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in WEB_SCHEMES:
        raise Refused(f"{brief_repr(text, 60)} is not an origin: it starts with http:// or https://, e.g. {ORIGIN_EXAMPLE}")
    scheme = scheme.lower()
    authority, after = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()
    if "@" in authority:
        raise Refused(f"{brief_repr(text, 60)} holds a user name or password, which no origin has; write "
                      f"{scheme}://HOST[:PORT], e.g. {ORIGIN_EXAMPLE}")  # fmt: skip
    host, port = _host_and_port(authority.lower(), text)
    origin = f"{scheme}://{host}" + (f":{port}" if port not in (None, WEB_SCHEMES[scheme]) else "")
    if after:  # a path (even a lone "/"), a query or a fragment: a browser's Origin header ends before them
        raise Refused(f"{brief_repr(text, 60)} has more than an origin (a path, query or fragment); write {origin}")
    return origin


def _host_and_port(authority: str, text: str) -> tuple[str, int | None]:
    host, port = authority, None
    if re.search(r":\d*$", authority) and not authority.endswith("]"):
        host, _, digits = authority.rpartition(":")
        try:
            port = parse_int(digits or "0")  # none after the colon: refused below; \d matched `:٣٠٠٠` (port 3000)
        except OtherDigits:
            raise Refused(f"{ascii_shown(text, 60)} has no valid port: write it with the digits 0-9, "
                          f"e.g. {ORIGIN_EXAMPLE}") from None  # fmt: skip
        if not 0 < port < 65536:
            raise Refused(f"{brief_repr(text, 60)} has no valid port: write a port from 1 to 65535, or none, "
                          f"e.g. {ORIGIN_EXAMPLE}")  # fmt: skip
    if not host.isascii() or not _HOST.fullmatch(host):
        raise Refused(f"{brief_repr(text, 60)} has no valid host: write a host name (its ASCII xn-- form for "
                      f"other letters), an IPv4 address or a [bracketed] IPv6 one, e.g. {ORIGIN_EXAMPLE}")  # fmt: skip
    if host.startswith("["):
        return f"[{_ipv6_as_browsers_write_it(host[1:-1], text)}]", port
    if _ENDS_IN_A_NUMBER.search(host):  # a browser reads the host as an IPv4 address then (WHATWG's URL parser)
        _check_ipv4(host, text)
    return host, port


# the last label all digits or 0x-hex: WHATWG's "ends in a number", read as an IPv4 address
_ENDS_IN_A_NUMBER = re.compile(r"(^|\.)([0-9]+|0x[0-9a-f]*)$")


def _check_ipv4(host: str, text: str) -> None:
    """An IPv4 host as a browser's Origin header writes it (four numbers 0-255, none with a
    leading 0): any shorter form (127.1, 0x7f.0.0.1, 010.0.0.1) is sent rewritten, and would never match."""
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and str(int(p)) == p and int(p) < 256 for p in parts):
        raise Refused(f"{brief_repr(text, 60)} has no valid IPv4 address: write its four numbers from 0 to 255, "
                      "as browsers send them, e.g. http://127.0.0.1:3000")  # fmt: skip


def _ipv6_as_browsers_write_it(address: str, text: str) -> str:
    """An IPv6 address as a browser's Origin header writes it (WHATWG's serializer): lower-case hex
    without leading zeros, the first longest run of two or more zero groups as `::`, never a dotted
    IPv4 tail. `[0:0:0:0:0:0:0:1]` is sent as `[::1]`: kept as written, it would never match."""
    try:
        number = int(ipaddress.IPv6Address(address))
    except ValueError:
        raise Refused(f"{brief_repr(text, 60)} has no valid IPv6 address: write one such as "
                      "http://[::1]:3000") from None  # fmt: skip
    groups = [number >> (16 * (7 - i)) & 0xFFFF for i in range(8)]
    start, length = 0, 1  # the run of zero groups to compress; none shorter than two
    i = 0
    while i < 8:
        end = i
        while end < 8 and groups[end] == 0:
            end += 1
        if end - i > length:
            start, length = i, end - i
        i = max(end, i + 1)
    hexes = [f"{g:x}" for g in groups]
    if length < 2:
        return ":".join(hexes)
    return ":".join(hexes[:start]) + "::" + ":".join(hexes[start + length :])


def _web_origins(values: list[str]) -> list[str]:
    origins = [web_origin(value) for value in values]
    return list(dict.fromkeys(origins))  # one each, in the order given


def _tiles(value: int) -> int | None:
    if not 0 <= value <= MAX_TILES:
        raise ValueError
    return value or None


def _setting(default: Any, check: Check | None = None, expect: str = "", path: bool = False, **kw: Any) -> Any:
    # `path`: a file name, which may hold bytes that are not UTF-8 (any other text may not)
    if isinstance(default, list):  # each Settings gets its own list
        kw["default_factory"] = lambda: list(default)
    else:
        kw["default"] = default
    return field(metadata={**_rule(check, expect), "path": path}, **kw)


# --- the sections ------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    path: str = _setting("", expect="a checkpoint folder (empty: the embedded demo model)", path=True)
    device: str = _setting("auto", _device, "one of auto, cpu, cuda, cuda:N")
    dtype: str = _setting(
        "auto", _choice(DTYPES, DTYPE_ALIASES), "one of auto, float32, bfloat16, float16 (or fp32, bf16, fp16)"
    )
    max_context: int = _setting(8192, _number(16, MAX_TOKENS), f"an integer from 16 to {MAX_TOKENS:,}")
    int4_backend: str = _setting("auto", _choice(INT4_BACKENDS), "one of auto, torch, dequant, triton, gemlite")
    compile: str = _setting("auto", _choice(COMPILE_MODES), "one of auto, on, off")


@dataclass
class GenerationSettings:
    temperature: float = _setting(0.0, _greedy_or(0.01, TEMPERATURE_MAX), "0 (greedy) or a number from 0.01 to 100")
    top_p: float = _setting(1.0, _number(0.0, 1.0, low_open=True), "a number in (0, 1]")
    top_k: int = _setting(0, _number(0, SEED_MAX), "an integer from 0 to 2**63-1 (0 turns it off)")
    repetition_penalty: float = _setting(1.0, _number(REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX),
                                         "a number from 0.01 to 100 (1 turns it off)")
    max_new_tokens: int = _setting(1024, _number(1, MAX_TOKENS), f"an integer from 1 to {MAX_TOKENS:,}")
    seed: int | None = _setting(
        None, _number(0, SEED_MAX), f"an integer from 0 to 2**63-1 ({SEED_MAX}), or none for a random seed"
    )
    stream_interval: int = _setting(1, _number(1, MAX_TOKENS), f"an integer from 1 to {MAX_TOKENS:,} (tokens per text update)")


@dataclass
class MediaSettings:
    # None: the checkpoint's max_dynamic_patch (12 for InternVL3); 0 means the same
    max_tiles: int | None = _setting(None, _tiles, f"an integer from 1 to {MAX_TILES}, or 0 / none for the checkpoint's limit")
    frames: int = _setting(8, _number(1, MAX_FRAMES), f"an integer from 1 to {MAX_FRAMES}")
    auto_attach: bool = _setting(True, expect="true or false")


@dataclass
class UISettings:
    markdown: bool = _setting(True, expect="true or false")
    stats: bool = _setting(True, expect="true or false")
    color: str = _setting("auto", _choice(COLORS), "one of auto, always, never")
    history: bool = _setting(True, expect="true or false")
    # empty: the state folder's history file, so $XDG_STATE_HOME moves it as it moves /save's sessions
    history_file: str = _setting("", expect="a file path (empty: the state folder's history)", path=True)
    plain: bool = _setting(False, expect="true or false")

    @property
    def history_path(self) -> Path:
        if not self.history_file:
            return xdg_dir(os.environ, "XDG_STATE_HOME", ".local/state") / "internvl-chat" / "history"
        return expand_home(self.history_file)


@dataclass
class SystemSettings:
    # None: the checkpoint's own system message; "" means no system message at all.
    message: str | None = _setting(None, expect="a text (unset: the checkpoint's default)")


@dataclass
class ServeSettings:
    """`internvl-chat serve`: where it listens, how many conversations it keeps cached, request limits."""

    host: str = _setting("127.0.0.1", expect="an address to bind (127.0.0.1: this machine only)")
    port: int = _setting(8000, _number(0, 65535), "a port from 0 to 65535 (0: any free port)")
    api_key: str = _setting("", _bearer_token, "a key of printable ASCII characters that clients send as a bearer token "
                            "(empty: no key)")  # fmt: skip
    model_id: str = _setting("", expect="the model name in /v1/models (empty: the checkpoint folder's name)")
    slots: int = _setting(2, _number(1, 64), "an integer from 1 to 64 (each a KV cache of max_context tokens)")
    queue_depth: int = _setting(8, _number(0, 100_000), "an integer from 0 to 100,000 (requests waiting behind the running one)")
    max_body_mb: int = _setting(64, _number(1, 4096), "an integer from 1 to 4096 (MiB per request body)")
    max_images: int = _setting(32, _number(1, 1024), "an integer from 1 to 1024 (images and videos per request)")
    max_image_pixels: int = _setting(40_000_000, _number(1, 178_956_970), "an integer from 1 to 178956970")
    max_frames: int = _setting(64, _number(1, 256), "an integer from 1 to 256 (frames per video)")
    max_video_decode_megapixels: int = _setting(20_000, _number(0), "an integer ≥ 0 (megapixels of frames decoded "
                                                "for a request's video files in all, those passed through to reach the sampled "
                                                "ones included; 0: no limit)")  # fmt: skip
    feature_cache_mb: int = _setting(256, _number(0), "an integer ≥ 0 (MiB of cached image features; 0 turns it off)")
    max_logprobs_mb: int = _setting(1024, _number(0), "an integer ≥ 0 (MiB a non-streamed request's logprobs may "
                                    "take at worst; 0: no limit)")  # fmt: skip
    allow_remote_media: bool = _setting(False, expect="true or false (let requests make the server fetch http(s) URLs)")
    shared_cache: bool = _setting(True, expect="true or false (false: no request reuses what another one cached)")
    allow_local_media: str = _setting("", expect="a folder whose files requests may name as file:// URLs (empty: none)",
                                     path=True)
    allow_origins: list[str] = _setting([], _web_origins, "web origins whose pages may call the server, each "
                                        f"http(s)://HOST[:PORT] (e.g. {ORIGIN_EXAMPLE}) or *, as a list or "
                                        "comma-separated text (empty: none)")  # fmt: skip
    max_connections: int = _setting(100, _number(1, 65535), "an integer from 1 to 65535 (open connections; a request on one more gets 503)")
    header_timeout: float = _setting(10.0, _number(0.0, TIMEOUT_MAX, low_open=True),
                                     "a number of seconds > 0 and ≤ 3600 (to send a request's line and headers)")
    body_timeout: float = _setting(60.0, _number(0.0, TIMEOUT_MAX, low_open=True),
                                   "a number of seconds > 0 and ≤ 3600 (to send a whole request body)")
    write_timeout: float = _setting(60.0, _number(0.0, TIMEOUT_MAX, low_open=True),
                                    "a number of seconds > 0 and ≤ 3600 (a client may read none of its answer)")
    keep_alive_timeout: float = _setting(5.0, _number(0.0, TIMEOUT_MAX, low_open=True),
                                         "a number of seconds > 0 and ≤ 3600 (an idle connection is kept open)")
    max_header_kb: int = _setting(16, _number(1, 1024), "an integer from 1 to 1024 (KiB of request line and headers)")


@dataclass
class RemoteSettings:
    """An OpenAI-compatible server to chat with instead of the local model (empty server: local)."""

    server: str = _setting("", expect="a server URL such as http://HOST:8000/v1 (empty: the local model)")
    api_key: str = _setting("", expect="the server's key (better in the OPENAI_API_KEY environment variable)")
    model: str = _setting("", expect="a model id the server serves (empty: the first one it lists)")
    dialect: str = _setting("auto", _choice(REMOTE_DIALECTS), f"one of {', '.join(REMOTE_DIALECTS)}")
    timeout: float = _setting(300.0, _number(REMOTE_TIMEOUT_MIN, REMOTE_TIMEOUT_MAX),
                              "a number of seconds from 0.001 to 86400 (a day)")
    answer_timeout: float = _setting(3600.0, _greedy_or(REMOTE_TIMEOUT_MIN, REMOTE_TIMEOUT_MAX),
                                     "0 (no bound) or a number of seconds from 0.001 to 86400 (a day): one answer's total time")


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "generation": GenerationSettings,
    "media": MediaSettings,
    "ui": UISettings,
    "system": SystemSettings,
    "serve": ServeSettings,
    "remote": RemoteSettings,
}


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    ui: UISettings = field(default_factory=UISettings)
    system: SystemSettings = field(default_factory=SystemSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)
    # "section.key" -> "default" | "config PATH" | "env NAME" | "flag" | "/set"
    sources: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        section, name = resolve_key(key).split(".")
        return getattr(getattr(self, section), name)

    def set(self, key: str, value: Any, source: str = "/set", flag: str | None = None) -> str:
        """Set one value (text is parsed by the field's type); returns the dotted key.

        Raises UsageError for an unknown key (with the closest one) or a bad value; `flag` is the
        flag the user typed for it (`--dtype`), which the message then names instead of the key.
        """
        dotted = resolve_key(key)
        # a message names the key once: `/set KEY` and a dotted key name it already
        # ("/set generation.top_p: must be …", "--frames: must be …; fix the value.")
        named = source == "/set" or key.strip().lower() == dotted or flag is not None
        _assign(self, dotted, value, where=flag or f"{source} {key}".strip(), names_key=named,
                fix="" if source == "/set" else "; fix the value.")
        self.sources[dotted] = source
        return dotted

    def is_default(self, key: str) -> bool:
        """Whether the value is the package's default (no config file, variable, flag or /set gave it)."""
        return self.sources.get(resolve_key(key), "default") == "default"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every value by section (secrets masked: this goes into saved session files)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        for dotted in SECRET_KEYS + URL_KEYS:
            section, name = dotted.split(".")
            out[section][name] = shown_value(dotted, out[section][name])
        return out


# --- keys --------------------------------------------------------------------------------------


def all_keys() -> list[str]:
    """Every dotted key, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def resolve_key(key: str) -> str:
    """A `/set` alias or a dotted key -> the dotted key; UsageError with a suggestion otherwise."""
    norm = key.strip().lower().replace("-", "_")
    if norm in SET_ALIASES:
        return SET_ALIASES[norm]
    if norm in all_keys():
        return norm
    candidates = list(SET_ALIASES) + all_keys()
    raise UsageError(f"unknown setting {key!r}{_suggest(norm, candidates)}; see /show for all settings.")


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field(dotted: str) -> tuple[dataclasses.Field, Any]:
    section, name = dotted.split(".")
    cls = SECTIONS[section]
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    return fld, typing.get_type_hints(cls)[name]


# --- parsing and validation --------------------------------------------------------------------


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _text_list(value: Any) -> list[str]:
    """A TOML array or repeated flag's values (each text), or one text (a variable, `/set`): its
    items split at commas, stripped, empty ones dropped."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError
    return [piece.strip() for item in items for piece in item.split(",") if piece.strip()]


def _coerce(value: Any, tp: Any) -> Any:
    """A TOML value, flag value or text -> a value of `tp`; ValueError when it is not one."""
    base, optional = _split_optional(tp)
    if typing.get_origin(base) is list:
        return _text_list(value)
    if isinstance(value, str) and base is not str:
        text = value.strip()
        if optional and text.lower() in _NONE:
            return None
        if base is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if base is int:
            return parse_int(text)
        if base is float:
            value = parse_float(text)
    if value is None:
        if optional:
            return None
        raise ValueError
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(value, bool):  # bool is an int subclass: never a number here
        raise ValueError
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if base is float:
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value) + 0.0  # -0.0 is 0.0: `--temperature -0` was shown back as "-0.0"
        raise ValueError
    if base is str and isinstance(value, str):
        return value
    raise ValueError


def _assign(settings: Settings, dotted: str, value: Any, where: str, names_key: bool = False,
            fix: str = "; fix the value.") -> None:
    """Parse, check and set one value; a bad one is a UsageError that starts with `where` (a file,
    variable or flag), then the key, unless `where` `names_key` already, and ends with `fix`
    (empty for `/set KEY VALUE`: the message says what VALUE must be)."""
    fld, tp = _field(dotted)
    subject = "" if names_key else f" {dotted}"
    bad = None
    if isinstance(value, str) and not fld.metadata.get("path"):  # a path keeps its bytes, for the file system
        value = typed_as_utf8(value)  # a flag's or variable's text under an ASCII locale: each byte of "é" a surrogate
        bad = undecodable_byte(value)
    if bad is not None:
        what = f"byte 0x{bad:02x}" if bad < 0x100 else f"U+{bad:04X}"
        raise UsageError(f"{visible(where)}:{subject} is not UTF-8 text ({what}){fix}")
    try:
        parsed = _coerce(value, tp)
        if fld.metadata.get("path") and isinstance(parsed, str) and "\x00" in parsed:
            raise ValueError  # no file name holds a NUL (a TOML "\u0000"): the history file's open raised ValueError
        check = fld.metadata.get("check")
        if parsed is not None and check is not None:
            parsed = check(parsed)
    except (Refused, OtherDigits) as refused:
        raise UsageError(f"{visible(where)}:{subject} {refused}{fix}") from None
    except (ValueError, TypeError):
        expect = fld.metadata.get("expect") or "a valid value"
        given = "" if dotted in SECRET_KEYS else f", not {brief_repr(value, 60)}"  # a key is never printed, even a bad one
        raise UsageError(f"{visible(where)}:{subject} must be {expect}{given}{fix}") from None
    section, name = dotted.split(".")
    setattr(getattr(settings, section), name, parsed)


# --- layers ------------------------------------------------------------------------------------


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """The user config file: $XDG_CONFIG_HOME/internvl-chat/config.toml (~/.config by default)."""
    return xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "internvl-chat" / "config.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    """A TOML file read as untrusted text: a regular file, size-limited, UTF-8 (see files.py)."""
    if os.path.abspath(path) == os.devnull:  # `--config /dev/null`: no user settings at all
        return {}
    text = read_text_file(path, "config file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        if _is_json_object(text):  # a model's config.json, or a saved session, taken for the settings file --config names
            raise UsageError(f"config file {visible(str(path))} is JSON, not a TOML settings file (as --print-config "
                             "shows); a model folder goes to --model, a saved session to /load") from None  # fmt: skip
        raise UsageError(f"config file {visible(str(path))} is not valid TOML ({visible(str(e))}); fix the file.") from None
    except ValueError:  # int() refusing an integer of thousands of digits (TOMLDecodeError is caught above)
        raise UsageError(f"config file {visible(str(path))} holds a number too large for any setting; fix the file.") from None
    except RecursionError:  # arrays nested thousands deep
        raise UsageError(f"config file {visible(str(path))} is nested too deeply to be a config file; fix the file.") from None


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _apply_toml(settings: Settings, data: dict[str, Any], path: Path, source: str, also: str = "") -> None:
    """`also`: the unknown environment variables' words, said in the same line as the file's stray
    names (one fix for both, not a run for each)."""
    problems = _name_problems(data)
    if problems:
        raise UsageError(_name_problems_line(visible(str(path)), problems) + (f" Also {also}" if also else ""))
    for section, table in data.items():
        for name, value in table.items():
            dotted = f"{section}.{name}"
            _assign(settings, dotted, value, where=str(path))
            settings.sources[dotted] = source


NAME_PROBLEMS_SHOWN = 5  # a file of hundreds of stray names would fill the screen


def _name_problems(data: dict[str, Any]) -> list[str]:
    """Every name in a config file that is not where a setting is, each with what to do: all of
    them at once, so a file with several typos takes one fix, not a run per typo."""
    problems = []
    for section, table in data.items():
        if section in SECTIONS and not isinstance(table, dict):
            problems.append(f"{section} must be a [{section}] table of settings")
        elif section in SECTIONS:
            problems += [_unknown_setting(section, name) for name in table if f"{section}.{name}" not in all_keys()]
        elif isinstance(table, dict) or _is_table_array(table):  # `[[name]]` is a header too
            problems.append(f"unknown section [{_name_shown(section)}]{_suggest(section, list(SECTIONS))}")
        else:
            problems.append(_outside_sections(section))
    return problems


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _unknown_setting(section: str, name: str) -> str:
    return f"unknown setting '{section}.{_name_shown(name)}'{_suggest(f'{section}.{name}', all_keys())}"


def _outside_sections(name: str) -> str:
    """A value written above every [section] header (`temperature = 0.5` first in the file): TOML
    reads it as a key of no section, which was reported as an "unknown section [temperature]"."""
    names = sorted({key.split(".")[1] for key in all_keys()})
    close = name if name in names else next(iter(difflib.get_close_matches(name, names, n=1, cutoff=0.5)), None)
    if close is None:
        return f"'{_name_shown(name)}' is above every [section] header, where no setting goes"
    homes = " or ".join(f"[{section}]" for section in SECTIONS if f"{section}.{close}" in all_keys())
    meant = "" if close == name else f"did you mean '{close}'? "
    return f"'{_name_shown(name)}' is above every [section] header ({meant}it goes under {homes})"


def _name_problems_line(shown: str, problems: list[str]) -> str:
    fix = "fix the file."
    if any(problem.startswith("unknown section") for problem in problems):
        fix = f"valid sections are {', '.join(SECTIONS)}."
    return f"{shown}: {_first_few(problems)}; {fix}"


def _first_few(items: list[str], say: Callable[[str], str] = str) -> str:
    """The first NAME_PROBLEMS_SHOWN of `items`, each as `say` words it (only those: a suggestion
    costs a search), joined by "; ", then how many more there are."""
    listed = [say(item) for item in items[:NAME_PROBLEMS_SHOWN]]
    if len(items) > len(listed):
        listed.append(f"and {len(items) - len(listed)} more")
    return "; ".join(listed)


def _name_shown(name: str, width: int = 60) -> str:
    """A section or key name from a file, for an error: escaped and cut short (TOML names have no
    length limit: a 100,000-character one was printed whole)."""
    return shortened(visible(name), width)


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def _our_env_names(env: Mapping[str, str]) -> list[str]:
    return [name for name in sorted(env) if name.startswith(ENV_PREFIX) and name not in OTHER_ENV_VARS]


def _unknown_env_words(env: Mapping[str, str]) -> str:
    """The `INTERNVL_CHAT_*` variables that name no setting, each with the name meant, and what to
    do ("" when there are none): all of them at once, as a config file's stray names."""
    names = [env_name(k) for k in all_keys()]
    unknown = [name for name in _our_env_names(env) if name not in names]
    if not unknown:
        return ""
    valid = names + list(OTHER_ENV_VARS)
    named = _first_few(unknown, lambda name: f"{_name_shown(name)}{_suggest(name, valid)}")
    if len(unknown) == 1:
        return f"unknown environment variable {named}; rename or unset it."
    return f"unknown environment variables {named}; rename or unset them."


def _apply_env(settings: Settings, env: Mapping[str, str]) -> None:
    by_name = {env_name(k): k for k in all_keys()}
    if unknown := _unknown_env_words(env):  # not one run per misspelt variable
        raise UsageError(unknown)
    ours = _our_env_names(env)
    for name in ours:
        _assign(settings, by_name[name], env[name], where=f"environment variable {name}")
        settings.sources[by_name[name]] = f"env {name}"


def _apply_openai_key(settings: Settings, env: Mapping[str, str]) -> None:
    """OPENAI_API_KEY, the variable every OpenAI client reads, when no key was set more specifically."""
    key = env.get(OPENAI_API_KEY_ENV, "").strip()
    if key and not settings.remote.api_key:
        settings.remote.api_key = key
        settings.sources["remote.api_key"] = f"env {OPENAI_API_KEY_ENV}"


def _masked(value: Any) -> Any:
    return "***" if value else value


_USER_INFO = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.-]*://)?)[^/?#]*@")  # `scheme://user:password@`, the scheme optional


def without_credentials(url: str) -> str:
    """A server URL without any user:password@ part (for a session file or a line on screen)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all (normalize_base_url says so, quoting it): the part before an @ still goes
        return _USER_INFO.sub(r"\1", url)
    if "://" not in url:  # `me:pw@host:8000` (http:// is implied): urlsplit reads `me` as the scheme
        return _USER_INFO.sub(r"\1", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))


def shown_value(dotted: str, value: Any) -> Any:
    """A value as it may be printed or saved with a session: a key masked, a URL without its password."""
    if dotted in SECRET_KEYS:
        return _masked(value)
    if dotted in URL_KEYS and isinstance(value, str):
        return without_credentials(value)
    return value


@contextmanager
def _named_by_variable(name: str | None) -> Iterator[None]:
    """A refusal of the file that the environment variable `name` (None: a flag) names says so: no path was typed."""
    try:
        yield
    except InternVLChatError as e:
        if name is not None:
            e.args = (f"{e} (the file ${name} names; fix it, or unset the variable)",)
        raise


def load_settings(
    config_path: str | Path | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the layers. `overrides` keys are dotted keys or `/set` aliases; None values are skipped.
    `flags` names the flag that gave an override (`{"model.dtype": "--dtype"}`): a bad value's
    message names it, as the user typed it, instead of the setting.

    `config_path` (or $INTERNVL_CHAT_CONFIG) must exist; the default user file may be absent.
    """
    settings = Settings()
    settings.sources = {key: "default" for key in all_keys()}
    _apply_toml(settings, _read_toml(DEFAULT_CONFIG_FILE), DEFAULT_CONFIG_FILE, "default")

    if config_path is None and env.get(ENV_CONFIG_FILE):
        config_path, named_by = env[ENV_CONFIG_FILE], ENV_CONFIG_FILE
    else:
        named_by = None
    with _named_by_variable(named_by):  # "config file c.toml does not exist" did not say where it came from
        if config_path is not None:
            refuse_web_address(config_path, "config file ")  # as a Path: "config file https:/example.com/… does not exist"
            user_file: Path | None = expand_home(config_path)
        else:
            try:
                user_file = default_config_path(env)
            except NoHomeFolder:  # no home folder, so no user config file in it (a container's arbitrary uid)
                user_file = None
            if user_file is not None and not os.path.lexists(user_file):  # a folder, a FIFO or a broken link there is refused, not skipped
                user_file = None
        if user_file is not None:
            _apply_toml(settings, _read_toml(user_file), user_file, f"config {user_file}", also=_unknown_env_words(env))

    _apply_env(settings, env)
    _apply_openai_key(settings, env)

    for key, value in (overrides or {}).items():
        if value is not None:
            settings.set(key, value, source="flag", flag=(flags or {}).get(key))
    return settings


# --- --print-config ----------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A value as the config file writes it: `true`, `0.7`, `"text"` (a TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        # a valid TOML basic string; TOML refuses DEL raw, and `visible` would write it and C1 controls
        # as \x.., which TOML cannot read: \u escapes
        return escape_hidden(json.dumps(value, ensure_ascii=False))
    return repr(value)


def toml_escaped(text: str, encoding: str | None) -> str:
    """`text` (format_settings') for a stream of `encoding`: where it is not UTF-8, each character
    that is not ASCII as a TOML escape (`\\u2026`, `\\U0001f306`), as one-shot --json is ASCII there.
    --print-config's output is made to be pasted into a config file, which TOML reads as UTF-8, and
    stdout's error handler (files.GLYPHS_OR_ESCAPES) wrote "…" as "..." and "é" as `\\xe9`, which
    TOML refuses (PYTHONIOENCODING=ascii, LC_ALL=C without UTF-8 mode); a Latin-1 one wrote its byte."""
    if text.isascii() or codecs.lookup(encoding or "utf-8").name == "utf-8":
        return text
    return "".join(c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


def _shown_sections(settings: Settings,
                    sections: Iterable[str] | None = None) -> Iterator[tuple[str, list[tuple[str, Any, str]]]]:  # fmt: skip
    """Each section (in the file's order; `sections`: only these, None: all) with its rows of
    (key, value as shown, where it came from): what both --print-config forms print."""
    for section, cls in SECTIONS.items():
        if sections is None or section in sections:
            yield section, [
                (fld.name, shown_value(f"{section}.{fld.name}", getattr(getattr(settings, section), fld.name)),
                 settings.sources.get(f"{section}.{fld.name}", "default"))
                for fld in dataclasses.fields(cls)
            ]  # fmt: skip


def format_settings(settings: Settings, unset: Mapping[str, str] | None = None, sections: Iterable[str] | None = None) -> str:
    """The merged settings as TOML lines, each with a `# from …` comment; unset values commented out,
    as `(not set)` or the words `unset` gives for that key (what is in use instead). `sections`:
    only these (in the file's order); None: all."""
    out: list[str] = []
    for section, rows in _shown_sections(settings, sections):
        lines = []
        for name, value, source in rows:
            instead = (unset or {}).get(f"{section}.{name}", "(not set)")
            if f"{section}.{name}" in SECRET_KEYS and value:
                # commented out: `api_key = "***"` pasted into a settings file, as this output
                # invites, set the key to three stars
                lines.append((f"# {name} = (set, not shown)", source))
                continue
            lines.append((f"{name} = {toml_value(value)}" if value is not None else f"# {name} = {instead}", source))
        width = max(len(line) for line, _ in lines)
        if out:
            out.append("")
        out.append(f"[{section}]")
        # values and sources (config paths) come from files and the environment: show them inert
        out.extend(visible(f"{line.ljust(width)}  # from {source}") for line, source in lines)
    return "\n".join(out) + "\n"


def format_settings_json(settings: Settings) -> str:
    """The merged settings as one JSON object, {section: {key: {"value": …, "from": …}}}, for scripts
    (`--print-config --json`); unset values are null. ASCII only: what came from files and the
    environment prints inert."""
    shown = {section: {name: {"value": value, "from": source} for name, value, source in rows}
             for section, rows in _shown_sections(settings)}  # fmt: skip
    return json.dumps(shown, indent=2) + "\n"

