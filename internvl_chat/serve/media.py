"""Media named in a request → measured items (content hash, tile count) → pixels when needed.

Only data: URLs are read by default. `allow_remote_media` lets the server fetch http(s) URLs
(within REMOTE_TIMEOUT_S each and REQUEST_REMOTE_TIMEOUT_S for all those of a request: RemoteBudget);
`allow_local_media` names the one folder whose files `file://` URLs may name (checked after
resolving symlinks). Bytes are checked by the app's own media code (media/image.py header probe
and pixel limits, media/video.py's frame sampler) from a private temporary file, so a request
image is tiled exactly as the same file attached in the terminal app.

Forms: `image_url` (an image file); `video_url` with a video file (frames sampled here), or
with `data:video/jpeg;base64,F1,F2,…` (frames already sampled: one tile each, as vLLM reads it).

`max_video_decode_pixels` bounds the decoding of a request's video files, all together, so one
small file of many large frames (or many files) cannot hold the engine: each file's decoding is
planned when the request is read (media/video.py `plan_video`: the frames decoded to reach the
sampled ones, from the header, read once, and the key frames) and refused there if over the limit
alone; the engine then counts what it decodes for the request (DecodeAllowance; files whose features are
cached, or whose frames the reused KV prefix holds, cost nothing: in the request's cache namespace alone, so
whether a request is refused never tells what another client sent), and a decode stops at the limit, also for
frames larger than the header says. A resent file that is decoded again counts again: the limit bounds the
work a request makes the engine do, and that work is done again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from ..chat.template import MediaSpec
from ..errors import Cancelled, MediaError, UsageError
from ..files import read_bytes_file
from ..media.image import count_tiles, load_image, probe_image
from ..media.video import load_video, plan_video
from ..media.video_cost import DecodeCost, DecodeOverBudget, megapixels
from ..threads import start_worker

if TYPE_CHECKING:
    from ..engine.config import ModelConfig
from .errors import APIError, bad_request, shown
from .namespaces import SHARED, found_again
from .options import ServeOptions

REMOTE_TIMEOUT_S = 20.0  # one http(s) fetch, however its host trickles it
REQUEST_REMOTE_TIMEOUT_S = 60.0  # all the fetches of one request together (up to max_images of them)
CANCEL_POLL_S = 0.05  # how often a fetch's watcher looks at its request's cancel event (the client gone, the server stopping)
PRESAMPLED = "frames sampled already (data:video/jpeg;base64,F1,F2,…)"
FRAME_LIST_TYPES = ("video/jpeg", "video/png", "video/webp")  # data:video/jpeg;base64,F1,F2,…


# (content key, tiles, largest width·height, the decoding a video file takes or None)
Measured = tuple[str, int, int, DecodeCost | None]
# one request's data: URL measurements, (namespace, kind, parameters, url digest) → (Measured, frame
# list): where the shared URL cache is not written (--no-shared-cache), a URL the request holds twice
# is still measured once; the request drops it when done, so nothing of it outlives the request
UrlMemo = dict[tuple, tuple[Measured, bool]]


@dataclass
class DecodeAllowance:
    """What the decoding of one request's video files has used of `limit` pixels (None: no limit)."""

    limit: int | None
    used: int = 0

    @property
    def left(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)


@dataclass
class MediaItem:
    """One image or video of a request: what it costs in the prompt and where its bytes are."""

    kind: str  # "image" or "video"
    key: str  # content hash + the parameters that change its tiles (+ the cache namespace): the feature-cache key
    tiles: int  # image tiles (thumbnail included) or video frames
    param: str  # where it sits in the request, for error messages
    url: str = field(default="", repr=False)  # a data: URL, decoded only if its features must be computed
    data: bytes = field(default=b"", repr=False)  # or the bytes already fetched (http, file)
    frame_list: bool = False  # a pre-sampled frame list (data:video/jpeg;base64,F1,F2,…)
    max_tiles: int | None = None  # None: the checkpoint's limit
    cost: DecodeCost | None = None  # a video file's decoding, as planned when it was measured (load_video's `planned`)

    @property
    def spec(self) -> MediaSpec:
        return MediaSpec(self.kind, self.tiles)


URL_CACHE_ENTRIES = 1024  # data: URLs remembered (by a digest of their text) so a resend skips decoding


class MediaReader:
    """Turns request media parts into MediaItems and, on demand, into pixel tiles.

    A conversation resends its images with every request. Their data: URLs are remembered by a
    BLAKE2 digest of their text (not the text: a cache of megabyte strings would hold hundreds of
    megabytes no setting accounts for), so a resent image is neither base64-decoded nor probed
    again; the measurements are then re-checked against the current limits.
    """

    def __init__(self, options: ServeOptions, config: ModelConfig):
        self.options = options
        self.config = config  # tile limits, tile size and thumbnail exactly as the app uses them
        self.image_size = config.image_size
        self.use_thumbnail = config.use_thumbnail
        # (namespace, kind, parameters, url digest) → ((content key, tiles, largest width·height, a video file's decoding), frame list)
        self._by_url: OrderedDict[tuple, tuple[Measured, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="internvl-chat-serve-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ---- bytes ------------------------------------------------------------------------------
    def fetch(self, url: str, param: str, what: str, remote: RemoteBudget | None = None) -> tuple[bytes, str]:
        """The bytes a media URL names and its declared type ("" when unknown). An http(s) fetch
        takes its time from `remote`, its request's (None: a budget of its own)."""
        if not url:  # (it was read as a local path)
            raise bad_request(f"the {what} URL is empty; send the {what} inline as a data: URL (data:TYPE;base64,…)",
                              param=param)  # fmt: skip
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return _data_url(url, param, what)
        if scheme in ("http", "https"):
            if not self.options.allow_remote_media:
                raise bad_request(f"{what} URLs over {scheme} are not fetched by this server; send the {what} inline as a "
                                  "data: URL (or start the server with --allow-remote-media)", param=param)  # fmt: skip
            return self._remote(url, param, what, remote or RemoteBudget()), ""
        if scheme == "file":
            return self._local(url, param, what), ""
        raise bad_request(f"the {what} URL must be a data: URL (base64); local paths are never read unless the server "
                          "allows a folder with --allow-local-media, and then as file:// URLs", param=param)  # fmt: skip

    def _remote(self, url: str, param: str, what: str, remote: RemoteBudget) -> bytes:
        """The fetch runs on a thread of its own, which this one leaves at the deadline or the cancel
        (after shutting its sockets): a look-up of the host's name has no socket to shut, and a resolver
        that did not answer held the request past them."""
        deadline = remote.next_fetch(what, url, param)
        outcome: list = []

        def work() -> None:
            try:
                outcome.append(self._download(url, param, what, deadline))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                outcome.append(e)
            finally:
                deadline.finish()

        start_worker(work, "serve-fetch")
        if not deadline.wait():  # stopped first: what the fetch thread still does is no one's concern
            deadline.check(what, url, param)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _download(self, url: str, param: str, what: str, deadline: _FetchDeadline) -> bytes:
        import httpx

        from .. import proxy_env

        limit = self.options.max_body_bytes
        try:
            answered: list[str] = []  # the responses so far: a URL refused after one is a redirect's Location
            hooks = [lambda r: answered.append(str(r.url)), lambda r: _refuse_downgrade(r, url, what, param)]
            client = proxy_env.client(timeout=deadline.seconds, follow_redirects=True, max_redirects=3,
                                      event_hooks={"response": hooks})  # fmt: skip
        except UsageError as e:  # the server's proxy setting, not the URL: the operator's to fix (checked at start too)
            raise APIError(502, f"this server cannot fetch {what} URLs: {e}; send the {what} inline as a data: URL",
                           code="proxy_error", param=param) from None  # fmt: skip
        try:
            with client:
                # redirects followed (with the trace): response.url is the last one's
                # identity: its bytes are decoded here, within the limit (_inflated), not by httpx
                with client.stream("GET", url, headers={"Accept-Encoding": "identity"},
                                   extensions={"trace": deadline.trace}) as response:  # fmt: skip
                    if response.status_code == 407:  # only a proxy sends it: ours, when the URL went through one
                        proxy = proxy_env.proxy_of(client, str(response.url))
                        if proxy is not None:
                            raise _proxy_failed(what, url, proxy, "asks for credentials (407)", param)
                    if response.status_code != 200:
                        raise bad_request(f"fetching the {what} at {shown(url)} gave HTTP {response.status_code}", param=param)
                    over = APIError(413, f"the {what} at {shown(url)} is over the {limit >> 20} MiB limit", param=param)
                    encoding = response.headers.get("content-encoding", "")
                    raw_limit = limit + _coding_slack(encoding, limit)
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > raw_limit:  # refused before its bytes come (or never do)
                        raise over
                    raw = _counted(response.iter_raw(), raw_limit, over)
                    parts, total = [], 0
                    for block in _decoded(raw, encoding, what, url, param):
                        total += len(block)
                        if total > limit:
                            raise over
                        parts.append(block)
                    deadline.check(what, url, param)  # a body that ends where the connection was shut: cut short
                    return b"".join(parts)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as e:
            if deadline.cancelled:  # its request's client left, or the server is stopping
                raise Cancelled() from None
            if deadline.passed:  # a connection made after it was shut at once
                raise deadline.failure(what, url, param) from None
            try:
                failed = str(e.request.url)  # the request that failed (a redirect's, maybe)
            except RuntimeError:  # httpx had not set it
                failed = url
            proxy = proxy_env.proxy_of(client, failed)
            if proxy is None:
                raise _fetch_failed(what, url, e, param) from None
            # the server's proxy is down or refused the connection: not the client's URL at fault
            raise _proxy_failed(what, url, proxy, f"failed ({type(e).__name__}: {shown(str(e))})", param) from None
        except httpx.HTTPError as e:
            if deadline.cancelled:
                raise Cancelled() from None
            if deadline.passed:  # its sockets were shut: the read that broke broke at the deadline
                raise deadline.failure(what, url, param) from None
            raise _fetch_failed(what, url, e, param) from None
        except (httpx.InvalidURL, ValueError) as e:  # a bad port, address, host name (UnicodeError) or character
            if answered:  # the client's URL was fetched: its host redirected to one httpx refuses (data:, a bad port)
                raise bad_request(f"cannot fetch the {what} at {shown(url)}: {shown(answered[-1])} redirects to a URL that "
                                  f"is not a valid http(s) URL ({shown(str(e))})", param=param) from None  # fmt: skip
            raise bad_request(f"the {what} URL is not a valid http(s) URL ({shown(str(e))}); check it", param=param) from None

    def _local(self, url: str, param: str, what: str) -> bytes:
        folder = self.options.allow_local_media
        if folder is None:
            raise bad_request(f"file:// {what} URLs are refused: this server reads no local files (start it with "
                              "--allow-local-media DIR to allow one folder)", param=param)  # fmt: skip
        try:
            parsed = urlparse(url)
        except ValueError as e:  # e.g. an unclosed [ in the host
            raise bad_request(f"the {what} URL is not a valid file:// URL ({shown(str(e))}); check it", param=param) from None
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"the file:// URL names host '{shown(parsed.netloc, 80)}'; only local files can be read", param=param)
        if "\x00" in unquote(parsed.path):
            raise bad_request(f"the {what} file:// URL holds a NUL character (%00); name the file without it", param=param)
        named = unquote(parsed.path)
        if not named.startswith("/"):  # would be looked up from the server's working folder
            raise bad_request(f"the {what} file:// URL must name an absolute path (file:///FOLDER/NAME)", param=param)
        outside = APIError(403, f"the {what} file is outside the folder this server may read", code="forbidden", param=param)
        try:
            # the folder first: whether a file outside it exists is none of the client's business
            if not Path(named).resolve().is_relative_to(folder):  # follows the links that exist
                raise outside
            path = Path(named).resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            raise bad_request(f"the {what} file {shown(named)} does not exist", param=param) from None
        if not path.is_relative_to(folder):  # a link made in between
            raise outside
        try:
            return read_bytes_file(path, what, self.options.max_body_bytes, MediaError)
        except MediaError as e:
            raise bad_request(str(e), param=param) from None

    # ---- measuring ---------------------------------------------------------------------------
    # `remote`: the time left to the request's http(s) fetches (None: a budget for this one alone)
    # `namespace`: the request's cache namespace (serve/namespaces.py), in every cache key of the item
    # `memo`: the request's own data: URL measurements (UrlMemo), for a namespace not found again
    def image(self, url: str, param: str, max_tiles: int | None, remote: RemoteBudget | None = None,
              namespace: str = SHARED, memo: UrlMemo | None = None) -> MediaItem:  # fmt: skip
        return self._item("image", (max_tiles,), url, param, max_tiles, remote, namespace=namespace, memo=memo)

    # `cancel` set (the client gone) stops the measuring of a video file (Cancelled): a count of its
    # frames by demuxing (an APNG, MPEG-PS or pipe AVI has none) reads the whole file
    def video(self, url: str, param: str, num_frames: int, remote: RemoteBudget | None = None,
              cancel: threading.Event | None = None, namespace: str = SHARED, memo: UrlMemo | None = None) -> MediaItem:  # fmt: skip
        return self._item("video", (num_frames,), url, param, num_frames, remote, cancel, namespace, memo)

    def _item(self, kind: str, params: tuple, url: str, param: str, count: int, remote: RemoteBudget | None,
              cancel: threading.Event | None = None, namespace: str = SHARED, memo: UrlMemo | None = None) -> MediaItem:  # fmt: skip
        url = url.strip(_URL_EDGES)
        inline = url[:5].lower() == "data:"
        url_key = (namespace, kind, params, _url_digest(url)) if inline else None
        # a request of its own namespace (--no-shared-cache) would remember in the shared cache what no
        # later one can find: it remembers in its own memo alone (see UrlMemo)
        if found_again(namespace):
            cache_key, memo = url_key, None
        else:
            cache_key = None
        known = self._recall(cache_key)
        if known is None and memo is not None and url_key is not None:
            known = memo.get(url_key)
        data, frame_list = b"", False
        if known is None:
            data, mime = self.fetch(url, param, kind, remote)
            frame_list = kind == "video" and mime in FRAME_LIST_TYPES
            if frame_list:
                known = self._measure_frames(data, param)
            elif kind == "video":
                known = self._measure_video(data, param, count, cancel)
            else:
                known = self._measure_image(data, param, count)
            self._remember(cache_key, known, frame_list)
            if memo is not None and url_key is not None:
                memo[url_key] = (known, frame_list)
        else:
            known, frame_list = known
        key, tiles, pixels, cost = known
        if namespace != SHARED:  # its features are cached under this key: found by requests of this namespace alone
            key = f"{namespace}/{key}"
        self._check_pixels(pixels, param, "the image" if kind == "image" else "a video frame")
        if cost is not None:
            self._check_decoding(cost, param)
        if kind == "video" and not frame_list and not 1 <= tiles <= self.options.max_frames:
            raise bad_request(f"num_frames must be from 1 to {self.options.max_frames}", param=param)
        if frame_list and tiles > self.options.max_frames:
            raise _too_many_frames(tiles, self.options.max_frames, param)
        return MediaItem(kind, key, tiles, param, url=url if inline else "", data=b"" if inline else data,
                         frame_list=frame_list, max_tiles=count, cost=cost)  # fmt: skip

    def _measure_image(self, data: bytes, param: str, max_tiles: int | None) -> Measured:
        with self._file(data) as path:
            width, height = self._checked(probe_image, path, param)
        low, high = self.config.tile_limits(max_tiles)
        tiles = count_tiles(width, height, high, self.use_thumbnail, self.image_size, low)
        return f"image:{low}-{high}:{_sha256(data)}", tiles, width * height, None

    def _measure_video(self, data: bytes, param: str, num_frames: int, cancel: threading.Event | None) -> Measured:
        if not 1 <= num_frames <= self.options.max_frames:
            raise bad_request(f"num_frames must be from 1 to {self.options.max_frames}", param=param)

        def check_frame(width: int, height: int) -> None:  # before the key frames are read (and decord indexes it)
            self._check_pixels(width * height, param, "a video frame")

        with self._file(data) as path:
            cost = self._checked(plan_video, path, param, num_frames, check_frame, cancel)  # one read of the header
        return f"video:{num_frames}:{_sha256(data)}", num_frames, cost.width * cost.height, cost

    def _measure_frames(self, data: bytes, param: str) -> Measured:
        # `data` holds the frames' base64 texts joined by commas (see _data_url)
        frames = data.count(b",") + 1  # before the split: 60 MB of "ab," split took 870 MB (21 million bytes objects)
        if frames > self.options.max_frames:
            raise _too_many_frames(frames, self.options.max_frames, param)
        texts = _frame_texts(data)
        digest = hashlib.sha256()
        largest = 0
        for number, text in enumerate(texts, start=1):
            frame = _b64(text, param, f"video frame {number}", percent=False)
            digest.update(len(frame).to_bytes(8, "little") + frame)
            with self._file(frame) as path:
                width, height = self._checked(probe_image, path, param, name=f"video frame {number}")
            largest = max(largest, width * height)
        return f"frames:{digest.hexdigest()}", len(texts), largest, None

    def _recall(self, cache_key: tuple | None):
        if cache_key is None:
            return None
        with self._lock:
            known = self._by_url.get(cache_key)
            if known is not None:
                self._by_url.move_to_end(cache_key)
            return known

    def _remember(self, cache_key: tuple | None, known: Measured, frame_list: bool) -> None:
        if cache_key is None:
            return
        with self._lock:
            self._by_url[cache_key] = (known, frame_list)
            self._by_url.move_to_end(cache_key)
            while len(self._by_url) > URL_CACHE_ENTRIES:
                self._by_url.popitem(last=False)

    def _check_pixels(self, pixels: int, param: str, what: str) -> None:
        limit = self.options.max_image_pixels
        if pixels > limit:
            raise bad_request(f"{what} has {pixels:,} pixels, over this server's limit of {limit:,}; downscale it",
                              param=param)  # fmt: skip

    def _check_decoding(self, cost: DecodeCost, param: str) -> None:
        limit = self.options.max_video_decode_pixels
        if limit is not None and cost.pixels > limit:
            fewer = "" if cost.from_start else ", fewer frames (num_frames)"
            raise bad_request(f"the video needs {cost} decoded to reach the frames sampled, over this server's limit of "
                              f"{megapixels(limit)} megapixels for a request's videos; send a shorter or smaller clip{fewer}, "
                              f"or {PRESAMPLED}", param=param)  # fmt: skip

    # ---- pixels (engine thread) ------------------------------------------------------------
    def pixels(
        self, item: MediaItem, cancel: threading.Event | None = None, allowance: DecodeAllowance | None = None
    ) -> torch.Tensor:
        """Normalised tiles [tiles, 3, S, S] of an item, decoded now (features were not cached).
        `cancel` set stops a video's decoding at its next frame (Cancelled); a video file decodes
        within what `allowance` has left (its request's; None: a new one), and uses it up."""
        size = self.image_size
        data = _data_url(item.url, item.param, item.kind)[0] if item.url else item.data
        if item.frame_list:
            tiles = []
            for number, text in enumerate(_frame_texts(data), start=1):
                with self._file(_b64(text, item.param, f"video frame {number}", percent=False)) as path:
                    name = f"video frame {number}"
                    tiles.append(self._checked(load_image, path, item.param, 1, False, size, name=name).pixel_values)
            pixels = torch.cat(tiles)
        elif item.kind == "image":
            low, high = self.config.tile_limits(item.max_tiles)
            with self._file(data) as path:
                pixels = self._checked(load_image, path, item.param, high, self.use_thumbnail, size, low).pixel_values
        else:
            allowance = allowance or DecodeAllowance(self.options.max_video_decode_pixels)
            with self._file(data) as path:
                pixels = self._checked(self._video, path, item.param, item.tiles, cancel, allowance, item.cost)
        if pixels.shape[0] != item.tiles:
            raise bad_request(f"the {item.kind} gave {pixels.shape[0]} tiles, expected {item.tiles}", param=item.param)
        return pixels

    def _video(self, path: Path, frames: int, cancel: threading.Event | None, allowance: DecodeAllowance,
               planned: DecodeCost | None = None) -> torch.Tensor:  # fmt: skip
        try:
            video = load_video(path, frames, None, None, self.image_size, allowance.left, cancel, planned)
        except DecodeOverBudget as e:
            if not allowance.used:
                raise
            this = f"this one needs {e.cost}" if e.cost is not None else "this one's frames are larger than its header says"
            raise DecodeOverBudget(f"the videos of this request need more decoding than this server's limit of "
                                   f"{megapixels(allowance.limit or 0)} megapixels for a request's videos: "
                                   f"{megapixels(allowance.used)} used by those before this one, and {this}; send fewer, "
                                   "shorter or smaller clips") from None  # fmt: skip
        allowance.used += video.decoded_pixels
        return video.pixel_values

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _checked(fn, path: Path, param: str, *args, name: str = "the media"):
        try:
            return fn(path, *args)
        except MediaError as e:
            # the messages name our temporary file; the client knows the part by its place
            # ("cannot read video /tmp/…" would become "cannot read video the media")
            message = str(e).replace(f"video {path}", "the video").replace(str(path), name)
            if isinstance(e, DecodeOverBudget):
                message += f", or send {PRESAMPLED}"
            raise bad_request(message, param=param) from None

    @contextmanager
    def _file(self, data: bytes):
        fd, name = tempfile.mkstemp(dir=self._tmp)  # mode 0600, a name nobody else chose
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)


def _url_digest(url: str) -> bytes:
    # 256 bits: two different URLs never meet by chance; surrogatepass, as a JSON body may hold "\\ud800"
    return hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=32).digest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_WHITESPACE = b" \t\n\r\f\v"
# what a URL parser strips from both ends of a URL (WHATWG's C0 controls and space): " data:…" was
# refused as a local path
_URL_EDGES = "".join(map(chr, range(0x21)))


# each byte's value as a hex digit, -1 for a byte that is none
_HEX_VALUES = np.full(256, -1, dtype=np.int16)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_HEX_VALUES[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


def _percent_decoded(data: bytes) -> bytes:
    """`data` with each "%XX" (two hex digits) made the byte it names, a '%' before anything else
    kept, as urllib's unquote_to_bytes reads it; done in arrays: that one splits at every '%', and
    a body of escapes alone (64 MiB of them) took 4.7 GB and half a minute."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) < 3:
        return data
    digits = _HEX_VALUES[raw]
    # escapes never overlap: the two bytes after an escape's '%' are hex digits, never a '%'
    escape = (raw[:-2] == ord("%")) & (digits[1:-1] >= 0) & (digits[2:] >= 0)
    out = raw.copy()
    out[:-2][escape] = (digits[1:-1][escape] * 16 + digits[2:][escape]).astype(np.uint8)
    keep = np.ones(len(raw), dtype=bool)
    keep[1:-1][escape] = False
    keep[2:][escape] = False
    return out[keep].tobytes()


def _frame_texts(data: bytes) -> list[bytes]:
    """A frame list's base64 texts, from _data_url's payload (percent-decoded already): each is read
    by _b64 with `percent` False."""
    return data.split(b",")


def _b64(text: bytes | str, param: str, what: str, percent: bool = True) -> bytes:
    """Standard base64, strictly, except for what encoders commonly add or leave out: line breaks
    and spaces (MIME and `base64` wrap at 76 columns) and the final `=` padding. `percent`: the
    text is a URL's, not yet percent-decoded (a frame list's texts are: see _data_url)."""
    try:
        data = (text.encode("ascii") if isinstance(text, str) else text).translate(None, _WHITESPACE)
    except UnicodeEncodeError:
        raise bad_request(f"the {what} data holds a character that is not base64; send the file's bytes base64-encoded",
                          param=param) from None  # fmt: skip
    if percent and b"%" in data:  # a data: URL is a URL: "%2B" is "+", as browsers and urllib read it ('%' is no base64)
        data = _percent_decoded(data).translate(None, _WHITESPACE)  # "%0A" wraps it too
    if not data:
        raise bad_request(f"the {what} data is empty; put the file's bytes, base64-encoded, after the comma", param=param)
    data += b"=" * (-len(data) % 4) if len(data) % 4 != 1 else b""
    try:
        if sys.version_info >= (3, 11):
            return binascii.a2b_base64(data, strict_mode=True)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        if re.search(rb"[-_]", data):
            raise bad_request(f"the {what} data is base64 in the URL-safe alphabet (- and _); send standard base64 (+ and /)",
                              param=param) from None  # fmt: skip
        raise bad_request(f"the {what} data is not valid base64 ({e}); send the file's bytes base64-encoded",
                          param=param) from None  # fmt: skip


class RemoteBudget:
    """The time one request's http(s) fetches have in all, counted from its first. Each fetch has
    REMOTE_TIMEOUT_S, but a request names up to max_images URLs: hosts that each trickled their file
    in just within it held a worker thread preparing the request for ten minutes and more.
    `cancel` (the request's: its client gone, or the server's shutdown grace period over) set
    stops a fetch at once (Cancelled): it ran on to its deadline, and held up the server's exit."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.seconds = REQUEST_REMOTE_TIMEOUT_S
        self.cancel = cancel
        self._ends: float | None = None

    def next_fetch(self, what: str, url: str, param: str) -> _FetchDeadline:
        """The deadline of the fetch that starts now; refused when the request's time is spent."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        now = time.monotonic()
        if self._ends is None:
            self._ends = now + self.seconds
        left = self._ends - now
        if left <= 0:
            raise _request_time_spent(what, url, self.seconds, "was not fetched", param)
        if left >= REMOTE_TIMEOUT_S:
            return _FetchDeadline(REMOTE_TIMEOUT_S, cancel=self.cancel)
        return _FetchDeadline(left, request_seconds=self.seconds, cancel=self.cancel)


class _FetchDeadline:
    """Ends a remote fetch `seconds` after it began by shutting its sockets (a blocked read returns
    at once). httpx times each read alone: a host that sent a byte now and then, in the head or the
    body, held the fetch and the worker thread preparing its request for ever (a client that left did
    not end it), and a few dozen such requests left no thread to prepare any other. `request_seconds`:
    the deadline is where the request's fetches, all together, run out of time (RemoteBudget).
    `cancel` set ends it the same way, at once (`cancelled`): a client that left, a server stopping."""

    def __init__(self, seconds: float, request_seconds: float | None = None, cancel: threading.Event | None = None):
        self.seconds = seconds
        self.request_seconds = request_seconds
        self.cancel = cancel
        self.passed = False
        self.cancelled = False
        self._sockets: list[socket.socket] = []
        self._copies: list[socket.socket] = []  # of each connection's descriptor, closed by `finish`
        self._lock = threading.Lock()
        self._done = threading.Event()

    def finish(self) -> None:
        """Called by the fetch's thread when it is done, whatever its outcome."""
        with self._lock:  # (not while `wait` shuts them)
            for copy in self._copies:
                copy.close()
        self._done.set()

    def wait(self) -> bool:
        """True once the fetch is done; False where the deadline or the cancel came first (its
        sockets shut, `passed` or `cancelled` set)."""
        ends = time.monotonic() + self.seconds
        while True:
            left = ends - time.monotonic()
            if left <= 0:
                break
            if self._done.wait(left if self.cancel is None else min(left, CANCEL_POLL_S)):
                return True
            if self.cancel is not None and self.cancel.is_set():
                break
        with self._lock:
            if left <= 0:
                self.passed = True
            else:
                self.cancelled = True
            for sock in self._sockets:  # (under the lock: `finish` may be closing the copies)
                _shut(sock)
        return False

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace of the fetch and its redirects: the sockets it connects (a proxy's too)."""
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                copy = None
                if event.endswith(".connect_tcp.complete"):
                    # a TLS handshake wraps the socket (detached, it shuts nothing then) and may never end: a
                    # copy of its descriptor shuts the connection during the handshake too
                    try:
                        copy = sock.dup()
                    except OSError:
                        pass
                with self._lock:
                    if copy is not None:
                        self._copies.append(copy)
                        self._sockets.append(copy)
                    self._sockets.append(sock)
                    if self.passed or self.cancelled:  # connected after the deadline (or the cancel)
                        _shut(sock)

    def check(self, what: str, url: str, param: str) -> None:
        """Cancelled, or the deadline's 400, where either ended the fetch."""
        if self.cancelled:
            raise Cancelled()
        if self.passed:
            raise self.failure(what, url, param)

    def failure(self, what: str, url: str, param: str) -> APIError:
        if self.request_seconds is not None:
            return _request_time_spent(what, url, self.request_seconds, "did not arrive in time", param)
        return bad_request(f"the {what} at {shown(url)} did not arrive within {self.seconds:g} s; check that its host "
                           f"answers, or send the {what} inline as a data: URL", param=param)  # fmt: skip


INFLATE_BLOCK = 1 << 20  # the most one decompression step of a fetched body makes at once
MAX_CODINGS = 5  # the most Content-Encoding codings of a fetched body decoded (as urllib3 allows)


def _coding_slack(encoding: str, limit: int) -> int:
    """What a body's Content-Encoding may add to it: the limit is for the decoded bytes, and gzip or
    deflate make bytes that do not compress (a PNG, a JPEG, a video) a little longer (a header and
    trailer, deflate's stored blocks: 5 bytes in 64 KiB). A body within the limit, compressed by a
    host that ignored our "identity", was a 413."""
    codings = sum(1 for c in encoding.split(",") if c.strip().lower() not in ("", "identity"))
    return codings * (limit // 512 + (64 << 10))


def _counted(blocks, limit: int, over: APIError):
    """`blocks`, refused (`over`) past `limit` bytes in all."""
    total = 0
    for block in blocks:
        total += len(block)
        if total > limit:
            raise over
        yield block


def _decoded(blocks, encoding: str, what: str, url: str, param: str):
    """A fetched body's bytes decoded as its Content-Encoding says (gzip, deflate, or several of
    them), INFLATE_BLOCK at most at a time. httpx decoded each block received whole: a body gzipped
    twice decoded a few hundred bytes into hundreds of megabytes at once, before any limit was seen."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip().lower() not in ("", "identity")]
    if len(codings) > MAX_CODINGS:  # each is a generator over the next: a thousand overflowed the stack (a 500)
        raise bad_request(f"the {what} at {shown(url)} came compressed {len(codings)} times over, more than the "
                          f"{MAX_CODINGS} this server decodes; serve it uncompressed, or send the {what} inline as a "
                          "data: URL", param=param)  # fmt: skip
    for coding in reversed(codings):  # the last one applied is undone first
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise bad_request(f"the {what} at {shown(url)} came compressed as {shown(coding, 40)}, which this server "
                              f"does not decode; serve it uncompressed, or send the {what} inline as a data: URL",
                              param=param)  # fmt: skip
        blocks = _inflated(blocks, coding, what, url, param)
    return blocks


def _inflated(blocks, coding: str, what: str, url: str, param: str):
    """One coding's decoding, INFLATE_BLOCK at most at a time. A gzip body may be several members
    one after the other (RFC 1952, as `cat a.gz b.gz` makes): each is decoded; bytes after the
    end that begin no member are ignored, as httpx ignores them."""
    decompressor = None
    head = b""  # a stream's first bytes, until the two that tell zlib's format from bare deflate data
    members = 0  # the streams (gzip members) ended so far
    rest_ignored = False
    try:
        for data in blocks:
            while data and not rest_ignored:
                if decompressor is None:
                    head += data
                    if len(head) < 2:  # (a host may send its first byte alone: it is no bare deflate data yet)
                        break
                    data, head = head, b""
                    if members and (coding == "deflate" or data[:2] != b"\x1f\x8b"):  # no other member
                        rest_ignored = True
                        break
                    # "deflate" is zlib's format, but some servers send bare deflate data (as httpx reads it)
                    zlib_head = data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
                    wbits = zlib.MAX_WBITS if zlib_head else -zlib.MAX_WBITS
                    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS if coding != "deflate" else wbits)
                while True:
                    out = decompressor.decompress(data, INFLATE_BLOCK)
                    if out:
                        yield out
                    if decompressor.eof:  # what follows it: another member, or bytes ignored
                        data, decompressor = decompressor.unused_data, None
                        members += 1
                        break
                    data = decompressor.unconsumed_tail
                    if not data and len(out) < INFLATE_BLOCK:  # (a full block may leave more to come)
                        break
        if decompressor is not None or (head and not members):  # a body that ends where its host closed
            raise bad_request(f"the {what} at {shown(url)} came compressed ({coding}) but was cut short: its compressed "
                              f"data does not end; serve it whole, or send the {what} inline as a data: URL",
                              param=param)  # fmt: skip
    except zlib.error as e:
        raise bad_request(f"the {what} at {shown(url)} came compressed ({coding}) but does not decompress "
                          f"({shown(str(e))}); serve it uncompressed, or send the {what} inline as a data: URL",
                          param=param) from None  # fmt: skip


def _shut(sock: socket.socket) -> None:
    from ..chat.remote_sockets import shut  # imports httpx, as a fetch does

    shut(sock)


def _request_time_spent(what: str, url: str, seconds: float, outcome: str, param: str) -> APIError:
    return bad_request(f"the {what} at {shown(url)} {outcome}: this server gives the http(s) media of a request "
                       f"{seconds:g} s in all; send fewer of them (the whole history counts), or send the {what} "
                       "inline as a data: URL", param=param)  # fmt: skip


def _refuse_downgrade(response, url: str, what: str, param: str) -> None:
    """An https response that redirects to plain http is refused, not followed (httpx calls this
    before it follows): the media would come unencrypted, open to anyone on the way, where the
    client asked for https. A Location httpx cannot read is left to httpx to refuse."""
    if response.url.scheme != "https" or not response.has_redirect_location:
        return
    try:
        target = response.url.join(response.headers["location"])
    except Exception:  # noqa: BLE001 - httpx refuses it as it follows, said as a bad redirect
        return
    if target.scheme == "http":
        raise bad_request(f"cannot fetch the {what} at {shown(url)}: {shown(str(response.url))} redirects to "
                          f"{shown(str(target))}, from https to plain http, which this server does not follow; give a "
                          f"URL that stays on https, or send the {what} inline as a data: URL", param=param)  # fmt: skip


def _fetch_failed(what: str, url: str, err: Exception, param: str) -> APIError:
    return bad_request(f"cannot fetch the {what} at {shown(url)} ({type(err).__name__}: {shown(str(err))})", param=param)


def _proxy_failed(what: str, url: str, proxy: str, which: str, param: str) -> APIError:
    """A fetch the server's own proxy failed (502): the operator's to fix, not the client's URL."""
    return APIError(502, f"cannot fetch the {what} at {shown(url)}: this server goes through {proxy}, which {which}; "
                    f"ask the server's operator to check it, or send the {what} inline as a data: URL",
                    code="proxy_error", param=param)  # fmt: skip


def _data_url(url: str, param: str, what: str) -> tuple[bytes, str]:
    """`data:[type][;params];base64,payload` → (bytes, type). A frame list keeps its commas (see video())."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(f"the {what} data: URL has no comma before its data", param=param)
    attrs = [a.strip().lower() for a in head[len("data:") :].split(";")]
    mime = attrs[0] if attrs else ""
    if "base64" not in attrs[1:]:
        raise bad_request(f"the {what} data: URL must be base64-encoded (data:TYPE;base64,…)", param=param)
    if mime in FRAME_LIST_TYPES and what == "video":  # an image_url's type is not trusted: its bytes are probed
        # decoded frame by frame (_frame_texts), percent-decoded first, once, as a URL parser reads
        # the URL: "%2C" is a comma between two frames, and "%252B" is "%2B", not "+"
        payload_bytes = payload.encode("ascii", "replace")
        return (_percent_decoded(payload_bytes) if b"%" in payload_bytes else payload_bytes), mime
    return _b64(payload, param, what), mime


def _too_many_frames(frames: int, limit: int, param: str) -> APIError:
    """A pre-sampled frame list longer than [serve] max_frames allows (it said what was wrong, not what to send)."""
    return bad_request(f"the video has {frames:,} frames, over this server's limit of {limit}; send at most {limit} "
                       "(sample fewer frames)", param=param)  # fmt: skip
