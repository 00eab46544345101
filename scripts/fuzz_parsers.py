"""Seeded mutation fuzzing of the parsers that read untrusted input.

    python scripts/fuzz_parsers.py --iterations 2000                 # every target
    python scripts/fuzz_parsers.py --targets session,video --seed 7

Each target mutates valid samples built here (bit flips, inserted and deleted bytes, duplicated
chunks, boundary integers, truncation, splices; JSON and TOML also one value at a time) and feeds
them to the project's own entry point: a session file to /load's reading and replay, a picture or
a video to the media loaders, a checkpoint folder to load_model, a server's answer to the remote
conversation, a request body to serve's validation (chat's and the text endpoint's), a config file
to load_settings. serve and
remote also get inputs built whole (fuzz_shapes.py): conversations in any order of roles and
content shapes, and event streams of every odd form cut at a byte offset, each with the outcome
it must have. Anything but the project's one-line error is a finding: another exception (an
outcome other than the one expected fails an assertion), a message of several lines or with a
control character, an input that runs past --timeout or past --max-rss-mb. Each runs in a
child process that the parent watches; a finding's input and traceback are written to --out.
Input i of a seed is the same on every run, so a finding is reproduced with --start i.
Not a test: the suite never runs it. Exit status 1 when something was found.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from fractions import Fraction
from pathlib import Path

import fuzz_shapes
from script_args import nonnegative_int, positive_float, positive_int

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("session", "image", "video", "checkpoint", "remote", "serve", "completions", "settings")

# ---------------------------------------------------------------- mutation

BOUNDARY = [0, 1, 2, 7, 8, 15, 16, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFF, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**31), -(2**63)]  # fmt: skip
TOKENS = [b"0", b"-1", b"1e309", b"NaN", b"Infinity", b"9" * 5000, b"[]", b"{}", b"null", b"true", b'""', b'"\\ud800"',
          b'"\\udcff"', b'"\\u0000"', b'"\\u001b[31m"', b"[" * 3000, b"\\", b'"', b"\n", b"\r", b"\x00", b"\xff"]  # fmt: skip
VALUES = [0, -1, 1, 2**31, 2**63, 10**30, 0.5, -0.0, 1e308, float("inf"), float("nan"), "", "x", "\ud800", "\udcff",
          "\x1b[31mred", "a\nb", "\x00", "\u202e", None, True, False, [], {}, [[]], {"": {}}, "9" * 100]  # fmt: skip


def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5, 8])):
        n, op = len(b), rng.randrange(9)
        if op == 0 and n:
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:
            i = rng.randrange(n)
            del b[i : i + rng.randint(1, 64)]
        elif op == 4 and n:
            i, k = rng.randrange(n), rng.randrange(n + 1)
            b[k:k] = b[i : i + rng.randint(1, 256)] * rng.choice([1, 2, 10])
        elif op == 5 and n:
            size = rng.choice([1, 2, 4, 8])
            raw = (rng.choice(BOUNDARY) % (1 << 8 * size)).to_bytes(size, rng.choice(["big", "little"]))
            i = rng.randrange(n)
            b[i : i + size] = raw
        elif op == 6 and n:
            del b[rng.randrange(n) :]
        elif op == 7 and others:
            other = rng.choice(others)
            if other:
                b = b[: rng.randrange(n + 1)] + other[rng.randrange(len(other)) :]
        elif op == 8:
            i = rng.randrange(n + 1)
            b[i : i + rng.choice([0, 1, 4])] = rng.choice(TOKENS)
    return bytes(b)


def mutate_value(obj, rng: random.Random):
    """One random node of parsed JSON (or TOML) replaced, deleted, duplicated or nudged."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        key = rng.choice(list(obj))
        r = rng.random()
        if r < 0.1:
            del obj[key]
        elif r < 0.15:
            obj[key + rng.choice(["", "x"])] = rng.choice(VALUES)
        else:
            obj[key] = mutate_value(obj[key], rng)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        r = rng.random()
        if r < 0.1:
            del obj[i]
        elif r < 0.2:
            obj.insert(i, json.loads(json.dumps(obj[i])))
        elif r < 0.23:
            obj.extend([obj[i]] * rng.choice([2, 100]))
        else:
            obj[i] = mutate_value(obj[i], rng)
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and rng.random() < 0.5:
        return rng.choice([obj + 1, obj - 1, -obj, obj * 1000, rng.choice(BOUNDARY), float(obj)])
    if isinstance(obj, str) and rng.random() < 0.5:
        return rng.choice([obj + rng.choice(VALUES[12:19]), obj[: len(obj) // 2], obj * 50, ""])
    return json.loads(json.dumps(rng.choice(VALUES)))


def mutate_json(samples: list[bytes], rng: random.Random) -> bytes:
    base = rng.choice(samples)
    if rng.random() < 0.85:
        obj = json.loads(base)
        for _ in range(rng.choice([1, 1, 2, 3])):
            obj = mutate_value(obj, rng)
        return json.dumps(obj, ensure_ascii=rng.random() < 0.85).encode("utf-8", "surrogatepass")
    return mutate_bytes(base, rng, samples)


# ---------------------------------------------------------------- targets
# Each: setup(work) once per child → samples; mutate(samples, rng) → bytes; run(bytes) raises only our errors.


class Target:
    def __init__(self, work: Path):
        self.work = work

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        return mutate_bytes(rng.choice(samples), rng, samples)

    def allowed(self) -> tuple[type[BaseException], ...]:
        from internvl_chat.errors import InternVLChatError

        return (InternVLChatError,)


def _picture():
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:30, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 8, (x + y) * 3], -1).astype(np.uint8))


def _write_video(path: Path, frames: int = 4, options: dict | None = None) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for n in range(frames):
            rgb = np.full((48, 64, 3), n * 60 % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class ImageTarget(Target):
    def samples(self) -> list[bytes]:
        import io

        picture, out = _picture(), []
        for fmt, kw in [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("WEBP", {}),
                        ("TIFF", {}), ("TIFF", {"compression": "tiff_deflate"}), ("BMP", {})]:  # fmt: skip
            buf = io.BytesIO()
            picture.save(buf, fmt, **kw)
            out.append(buf.getvalue())
        buf = io.BytesIO()
        exif = picture.getexif()
        exif[0x0112] = 6
        picture.save(buf, "JPEG", exif=exif)
        return [*out, buf.getvalue()]

    def run(self, data: bytes) -> None:
        from internvl_chat.media.image import load_image, probe_image

        path = self.work / "input.png"
        path.write_bytes(data)
        probe_image(path)
        load_image(path, max_tiles=2)


class VideoTarget(Target):
    def samples(self) -> list[bytes]:
        plain = _write_video(self.work / "plain.mp4")
        fragmented = _write_video(self.work / "fragmented.mp4", options={"movflags": "frag_keyframe+empty_moov"})
        return [plain.read_bytes(), fragmented.read_bytes(), _write_video(self.work / "clip.mkv", 3).read_bytes()]

    def run(self, data: bytes) -> None:
        from internvl_chat.media.video import load_video, probe_video

        path = self.work / "input.mp4"
        path.write_bytes(data)
        probe_video(path)
        load_video(path, num_frames=2)


class SessionTarget(Target):
    """A session file through /load's steps: reading, the settings it restores, measuring its media, the replay."""

    def samples(self) -> list[bytes]:
        import internvl_chat
        from internvl_chat.chat.sampling import SamplingParams
        from internvl_chat.chat.session import Session
        from internvl_chat.engine.loader import load_model
        from internvl_chat.settings import load_settings

        loaded = load_model(Path(internvl_chat.__file__).parent / "demo_model", device="cpu", dtype="float32", max_context=4096)
        self.session = Session(loaded, SamplingParams(max_new_tokens=6))
        self.settings = load_settings(os.devnull, env={})
        _picture().save(self.work / "picture.png")
        video = _write_video(self.work / "clip.mp4")
        turns = [("hello", []), ("what is this?", [self.session.describe_image(self.work / "picture.png", 2)]),
                 ("and this?", [self.session.describe_video(video, 2, (0.0, 0.3))])]  # fmt: skip
        for text, media in turns:
            for _ in self.session.ask(text, media):
                pass
        saved = self.session.save(self.work / "saved.json", self.settings.to_dict())
        local = saved.read_bytes()
        data = json.loads(local)
        data["backend"] = {"kind": "remote", "server": "http://gpu:8000/v1", "model": "m", "dialect": "vllm"}
        for answer in data["messages"][1::2]:
            del answer["token_ids"]
            answer["usage"] = {"prompt_tokens": 3, "completion_tokens": 2}
        self.paths = [str(self.work / n) for n in ("picture.png", "clip.mp4", "fifo", ".")] + ["/dev/zero", "x" * 5000, "~nobody/x"]
        os.mkfifo(self.work / "fifo")
        return [local, json.dumps(data).encode()]

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        data = mutate_json(samples, rng)
        if rng.random() < 0.3:  # a media path elsewhere: another file, a FIFO, a device, a folder
            try:
                obj = json.loads(data)
                media = [m for msg in obj["messages"] for m in msg["media"]]
                rng.choice(media)[rng.choice(["path", "relative_path"])] = rng.choice(self.paths)
                return json.dumps(obj).encode()
            except Exception:  # noqa: BLE001 - a mutation that broke the structure: keep it
                pass
        return data

    def run(self, data: bytes) -> None:
        import copy

        from internvl_chat.chat.sampling import params_from_settings
        from internvl_chat.chat.session_file import read_session_file
        from internvl_chat.ui.saved_sessions import RESTORED_SETTINGS

        path = self.work / "input.json"
        path.write_bytes(data)
        saved = read_session_file(path, 1000, (997, 998, 999))
        trial = copy.deepcopy(self.settings)
        for key in RESTORED_SETTINGS:
            section, name = key.split(".")
            if name in saved.settings.get(section, {}):
                trial.set(key, saved.settings[section][name], source="session")
        params_from_settings(trial)
        self.session.restore(self.session.read_saved(path))


class CheckpointTarget(Target):
    """A tiny checkpoint with one file mutated (most often the safetensors header), through load_model."""

    FILES = ["model.safetensors"] * 5 + ["config.json"] * 4 + ["tokenizer_config.json", "tokenizer.json"]

    def samples(self) -> list[bytes]:
        sys.path.insert(0, str(REPO / "scripts"))
        from make_tiny_checkpoint import build_tokenizer, make_tiny_checkpoint

        build_tokenizer(self.work / "tokenizer")
        self.folder = make_tiny_checkpoint(self.work / "model", seed=0, tokenizer_dir=self.work / "tokenizer")
        self.original = {name: (self.folder / name).read_bytes() for name in set(self.FILES)}
        return [b""]

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        name = rng.choice(self.FILES)
        data = self.original[name]
        if name != "model.safetensors":
            return name.encode() + b"\0" + mutate_json([data], rng)
        size = struct.unpack("<Q", data[:8])[0]
        header, rest = data[8 : 8 + size], data[8 + size :]
        if rng.random() < 0.6:
            obj = json.loads(header)
            for _ in range(rng.choice([1, 2])):
                obj = mutate_value(obj, rng)
            header = json.dumps(obj).encode()
        else:
            header = mutate_bytes(header, rng, [])
        if rng.random() < 0.1:
            rest = rest[: rng.randrange(len(rest) + 1)]
        declared = len(header) if rng.random() < 0.9 else rng.choice(BOUNDARY) % 2**64
        return name.encode() + b"\0" + struct.pack("<Q", declared) + header + rest

    def run(self, data: bytes) -> None:
        from internvl_chat.engine.loader import load_model

        name, content = data.split(b"\0", 1)
        target = self.folder / name.decode()
        target.write_bytes(content)
        try:
            load_model(self.folder, device="cpu", dtype="float32", max_context=256)
        finally:
            target.write_bytes(self.original[name.decode()])


class RemoteTarget(Target):
    """A server's answer (event stream, JSON, error, model list) through the remote conversation and its save/load."""

    def samples(self) -> list[bytes]:
        def chunk(delta: dict, finish=None, **extra) -> bytes:
            body = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        stream = (b": ping\n\n" + chunk({"role": "assistant", "content": ""}) + chunk({"content": "A red"})
                  + chunk({"content": " circle."}, "stop") + b'data: {"choices": [], "usage": {"prompt_tokens": 9, '
                  b'"completion_tokens": 2, "total_tokens": 11, "prompt_tokens_details": {"cached_tokens": 4}}}\n\n'
                  b"data: [DONE]\n\n")  # fmt: skip
        whole = {"choices": [{"index": 0, "message": {"content": "A red circle."}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}  # fmt: skip
        error = {"error": {"message": "This model's maximum context length is 8192 tokens", "type": "BadRequestError"}}
        models = {"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 8192}]}
        return [b"S\0" + stream, b"J\0" + json.dumps(whole).encode(), b"E\0" + json.dumps(error).encode(),
                b"M\0" + json.dumps(models).encode()]  # fmt: skip

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        if rng.random() < 0.4:  # a stream built whole, cut somewhere: its outcome is known (fuzz_shapes.py)
            dialect = rng.choice(["vllm", "lmdeploy", "sglang", "llamacpp", "internvl-chat", "generic"])
            return b"\0".join([b"G", b"200", b"0", dialect.encode(), json.dumps(fuzz_shapes.stream_spec(rng)).encode()])
        base = rng.choice(samples)
        kind, body = base[:1], base[2:]
        if kind == b"S" and rng.random() < 0.6:
            events = body.split(b"\n\n")
            k = rng.randrange(len(events))
            if events[k].startswith(b"data: {"):
                obj = mutate_value(json.loads(events[k][6:]), rng)
                events[k] = b"data: " + json.dumps(obj).encode()
            else:
                events[k] = rng.choice([b"event: error\ndata: oops", b"data: [DONE]", b"data:", b": ping", b"\r\n"])
            body = b"\n\n".join(events)
        elif kind == b"S":
            body = mutate_bytes(body, rng, [])
        else:
            body = mutate_json([body], rng)
        status = rng.choice([400, 413, 429, 500, 503, 302, 299]) if kind == b"E" else 200
        piece = rng.choice([0, 0, 1, 3, 64])
        dialect = rng.choice(["vllm", "lmdeploy", "sglang", "llamacpp", "ollama", "internvl-chat", "generic"])
        return b"\0".join([kind, str(status).encode(), str(piece).encode(), dialect.encode(), body])

    def run(self, data: bytes) -> None:
        import httpx

        from internvl_chat.chat.remote import RemoteConversation
        from internvl_chat.chat.remote_http import ApiClient
        from internvl_chat.chat.sampling import SamplingParams

        kind, status, piece, dialect, body = data.split(b"\0", 4)
        if kind == b"G":
            self.run_built(json.loads(body), dialect.decode())
            return
        piece = int(piece)
        content_type = "text/event-stream" if kind == b"S" else "application/json"

        def answer(request: httpx.Request) -> httpx.Response:
            content = iter([body[i : i + piece] for i in range(0, len(body), piece)]) if piece else body
            return httpx.Response(int(status), headers={"content-type": content_type, "retry-after": "5"}, content=content)

        client = ApiClient("http://fuzz.invalid/v1", timeout=30)
        client.http._transport = httpx.MockTransport(answer)  # no network: the answer is the input
        try:
            if kind == b"M":
                client.models()
                return
            conversation = RemoteConversation(client, "m", dialect.decode(), 100_000, SamplingParams(max_new_tokens=64))
            for _ in conversation.ask("hi"):
                pass
            conversation.save(self.work / "remote.json", {})
            again = RemoteConversation(client, "m", dialect.decode(), 100_000)
            again.load(self.work / "remote.json")
            assert [t.reply for t in again.turns] == [t.reply for t in conversation.turns], "an answer changed in save/load"
        finally:
            client.close()

    def run_built(self, spec: dict, dialect: str) -> None:
        """A built stream cut at its offset (or at each in turn): the answer kept and its finish_reason,
        or our one-line error when no text came, as `fuzz_shapes.stream_outcome` says."""
        import httpx

        from internvl_chat.chat.remote import RemoteConversation
        from internvl_chat.chat.remote_http import ApiClient
        from internvl_chat.chat.sampling import SamplingParams
        from internvl_chat.chat.session_file import read_session_file
        from internvl_chat.errors import RemoteError
        from internvl_chat.files import replace_lone_surrogates

        whole, events = fuzz_shapes.build_stream(spec)
        if spec["cut"] == "sweep":
            cuts = range(0, len(whole) + 1, max(1, len(whole) // 150))
        else:
            cuts = [len(whole) if spec["cut"] == "whole" else spec["cut"] % (len(whole) + 1)]
        step = spec["piece"]
        for cut in cuts:
            sent = whole[:cut]
            broken = spec.get("broken", False) and cut < len(whole)
            came = [(name, data) for end, name, data in events if end <= cut]
            want = fuzz_shapes.stream_outcome(came, replace_lone_surrogates, broken)

            def answer(request: httpx.Request, sent=sent, broken=broken) -> httpx.Response:
                def pieces():
                    yield from ([sent[i : i + step] for i in range(0, len(sent), step)] if step else [sent])
                    if broken:  # as a connection lost there: what came before is all the client has
                        raise httpx.ReadError("connection reset by the fuzzer")

                return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=pieces())

            client = ApiClient("http://fuzz.invalid/v1", timeout=30)
            client.http._transport = httpx.MockTransport(answer)
            try:
                conversation = RemoteConversation(client, "m", dialect, 100_000, SamplingParams(max_new_tokens=64))
                try:
                    finals = [e for e in conversation.ask("hi") if e["finish_reason"] is not None]
                except RemoteError as e:
                    assert want is None, f"cut at {cut} of {len(whole)}: {e} (want {want!r})"
                    assert not conversation.turns, "a failed answer left a turn"
                    continue
                got = (finals[-1]["finish_reason"], conversation.turns[-1].reply)
                assert got == want, f"cut at {cut} of {len(whole)}: got {got!r}, want {want!r}"
                path = conversation.save(self.work / "built.json", {})
                saved = read_session_file(path, None, ())
                assert (saved.turns[-1].finish_reason, saved.turns[-1].reply) == want, "save/load changed the answer"
            finally:
                client.close()


class ServeTarget(Target):
    """A chat-completions request body through serve's validation and prompt building."""

    def samples(self) -> list[bytes]:
        import io

        import internvl_chat
        from internvl_chat.engine.loader import load_model
        from internvl_chat.serve.answers import AnswerMemory
        from internvl_chat.serve.conversation import PromptMaker
        from internvl_chat.serve.media import MediaReader
        from internvl_chat.serve.options import ServeOptions

        loaded = load_model(Path(internvl_chat.__file__).parent / "demo_model", device="cpu", dtype="float32", max_context=8192)
        options = ServeOptions()
        self.maker = PromptMaker(loaded, options, AnswerMemory(), MediaReader(options, loaded.config))
        buf = io.BytesIO()
        _picture().save(buf, "PNG")
        png = base64.b64encode(buf.getvalue()).decode()
        mp4 = base64.b64encode(_write_video(self.work / "clip.mp4").read_bytes()).decode()
        frames = []
        for shade in (40, 200):
            out = io.BytesIO()
            _picture().point(lambda v, shade=shade: (v + shade) % 256).save(out, "JPEG")
            frames.append(base64.b64encode(out.getvalue()).decode())
        self.urls = {"png": f"data:image/png;base64,{png}", "mp4": f"data:video/mp4;base64,{mp4}",
                     "frames": "data:video/jpeg;base64," + ",".join(frames)}  # fmt: skip
        self.loaded = loaded
        bodies = [
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9,
             "top_k": 40, "max_tokens": 20, "seed": 3, "stop": ["\n", "###"], "repetition_penalty": 1.1, "cache_salt": "team-a",
             "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "so?"}]}]},
            {"model": "m", "mm_processor_kwargs": {"max_dynamic_patch": 4}, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "max_dynamic_patch": 2}}]}]},
            {"model": "m", "media_io_kwargs": {"video": {"num_frames": 3}}, "max_completion_tokens": 5, "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": f"data:video/mp4;base64,{mp4}"}]}]},
        ]  # fmt: skip
        return [json.dumps(b).encode() for b in bodies]

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        if rng.random() < 0.5:  # a conversation built whole: any order of roles and content shapes
            body = fuzz_shapes.conversation(rng, self.urls)
            if rng.random() < 0.2:
                body = mutate_value(body, rng)
            return json.dumps(body, ensure_ascii=rng.random() < 0.85).encode("utf-8", "surrogatepass")
        return mutate_json(samples, rng)

    def allowed(self) -> tuple[type[BaseException], ...]:
        from internvl_chat.serve.errors import APIError

        return (*super().allowed(), APIError)

    def run(self, data: bytes) -> None:
        from internvl_chat.chat.sampling import SamplingParams
        from internvl_chat.serve.conversation import sampling_params
        from internvl_chat.serve.protocol import parse_request

        request = parse_request(data)
        prompt = self.maker.make(request)
        sampling_params(request, SamplingParams(), len(prompt.ids), 8192)
        self.check(request, prompt)

    def check(self, request, prompt) -> None:
        """An accepted request's prompt is its conversation as the chat template lays it out."""
        builder = self.maker.builder
        tokens_per_tile = self.loaded.config.tokens_per_tile
        want = fuzz_shapes.expected_prompt_text(request, prompt, self.maker.default_system, tokens_per_tile)
        got = self.maker.tokenizer.decode(prompt.ids)
        if got != want:
            at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise AssertionError(f"the prompt differs from its conversation at character {at}: {got[at:at + 40]!r} for {want[at:at + 40]!r}")
        tiles = sum(m.tiles for m in prompt.media)
        assert prompt.ids.count(builder.img_context_id) == tokens_per_tile * tiles, "image tokens do not match the media"
        runs = sum(1 if m.kind == "image" else m.tiles for m in prompt.media)
        assert len(prompt.spans) == runs, f"{len(prompt.spans)} image runs recorded for {runs}"
        for span in prompt.spans:
            assert prompt.ids[span.start] == builder.img_start_id and prompt.ids[span.end - 1] == builder.img_end_id
            assert span.end - span.start - 2 == tokens_per_tile * span.tiles, "a run's length is not its tiles'"


class CompletionsTarget(Target):
    """A /v1/completions request body through its validation, prompt building and sampling settings."""

    def samples(self) -> list[bytes]:
        import internvl_chat
        from internvl_chat.engine.loader import load_model
        from internvl_chat.serve.answers import AnswerMemory
        from internvl_chat.serve.conversation import PromptMaker
        from internvl_chat.serve.media import MediaReader
        from internvl_chat.serve.options import ServeOptions

        loaded = load_model(Path(internvl_chat.__file__).parent / "demo_model", device="cpu", dtype="float32", max_context=8192)
        options = ServeOptions()
        self.maker = PromptMaker(loaded, options, AnswerMemory(), MediaReader(options, loaded.config))
        self.defaults = options.defaults
        bodies = [
            {"model": "m", "prompt": "The cat sat on the", "max_tokens": 5},
            {"model": "m", "prompt": ["one", "two words"], "n": 2, "temperature": 0.7, "top_p": 0.9, "seed": 3,
             "stop": ["\n", "."], "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}},
            {"model": "m", "prompt": [[1, 2, 3, 4], [5, 6]], "max_tokens": 0, "echo": True, "logprobs": 1,
             "temperature": 0, "seed": 1234},  # lm-eval local-completions' loglikelihood shape
            {"model": "m", "prompt": [17, 42, 99], "max_tokens": 1, "echo": True, "logprobs": 5, "best_of": 1,
             "cache_salt": "s3cr3t-salt"},
        ]  # fmt: skip
        return [json.dumps(b).encode() for b in bodies]

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        return mutate_json(samples, rng)

    def allowed(self) -> tuple[type[BaseException], ...]:
        from internvl_chat.serve.errors import APIError

        return (*super().allowed(), APIError)

    def run(self, data: bytes) -> None:
        from internvl_chat.serve.conversation import sampling_params
        from internvl_chat.serve.protocol import choices
        from internvl_chat.serve.text_completions import MAX_PROMPTS, parse_completion_request, text_prompts

        request = parse_completion_request(data)
        prompts = text_prompts(request, self.maker, 8192)
        params = sampling_params(request, self.defaults, prompts.longest, 8192)
        # what an accepted request must be: prompts the engine can hold, ids it can embed, an answer that fits
        assert 1 <= len(prompts.prompts) * choices(request) <= MAX_PROMPTS, "more answers than the server gives"
        vocab = min(self.maker.loaded.config.text.vocab_size, len(self.maker.tokenizer))
        for prompt, text in zip(prompts.prompts, prompts.texts):
            assert 1 <= len(prompt.ids) < 8192, f"a prompt of {len(prompt.ids)} tokens was accepted"
            assert all(isinstance(t, int) and 0 <= t < vocab for t in prompt.ids), "an id outside the vocabulary"
            assert isinstance(text, str), "the echo is not text"
        assert 0 <= params.max_new_tokens <= 8192 - prompts.longest, "the answer does not fit beside its prompt"


class SettingsTarget(Target):
    """A config file through load_settings, and --print-config's output read back to the same values."""

    def samples(self) -> list[bytes]:
        user = ('[generation]\ntemperature = 0.7\ntop_k = 40\nseed = 12\n[media]\nmax_tiles = 6\n[ui]\n'
                'history_file = "~/h.txt"\n[system]\nmessage = """two\nlines"""\n[remote]\nserver = "http://u:p@h:8000/v1"\n'
                'timeout = 12.5\n[serve]\nport = 8080\n')  # fmt: skip
        return [(REPO / "internvl_chat" / "configs" / "default.toml").read_bytes(), user.encode()]

    def mutate(self, samples: list[bytes], rng: random.Random) -> bytes:
        base = rng.choice(samples)
        if rng.random() < 0.3:
            return mutate_bytes(base, rng, samples)
        data = tomllib.loads(base.decode())
        for _ in range(rng.choice([1, 2, 3])):
            data = mutate_value(data, rng)
        return _toml(data).encode("utf-8", "surrogatepass")

    def run(self, data: bytes) -> None:
        from internvl_chat.chat.sampling import params_from_settings
        from internvl_chat.settings import format_settings, load_settings

        path, again = self.work / "input.toml", self.work / "printed.toml"
        path.write_bytes(data)
        settings = load_settings(path, env={})
        params_from_settings(settings)
        again.write_text(format_settings(settings), encoding="utf-8")
        before, after = settings.to_dict(), load_settings(again, env={}).to_dict()
        before["remote"].pop("api_key"), after["remote"].pop("api_key")  # masked when printed
        assert before == after, "--print-config's output reads back to other settings"


def _toml(value, top: bool = True) -> str:
    """A value as TOML (tables at the top level, inline below)."""
    if top and isinstance(value, dict):
        plain = [f"{json.dumps(str(k))} = {_toml(v, False)}" for k, v in value.items() if not isinstance(v, dict)]
        tables = [f"[{json.dumps(str(k))}]\n" + "\n".join(f"{json.dumps(str(a))} = {_toml(b, False)}" for a, b in v.items())
                  for k, v in value.items() if isinstance(v, dict)]  # fmt: skip
        return "\n".join(plain + tables)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and abs(value) == float("inf"):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v, False) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v, False)}" for k, v in value.items()) + "}"
    return json.dumps("" if value is None else str(value))


CLASSES = {"session": SessionTarget, "image": ImageTarget, "video": VideoTarget, "checkpoint": CheckpointTarget,
           "remote": RemoteTarget, "serve": ServeTarget, "completions": CompletionsTarget, "settings": SettingsTarget}  # fmt: skip


# ---------------------------------------------------------------- the child: inputs one after another


def _bad_message(text: str) -> bool:
    return "\n" in text or any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 or c in "\u202e\u2066\u2067\u2068"
                               for c in text)  # fmt: skip


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "internvl_chat" in f.filename] or frames[-1:]
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"


def _mark(status, text: str) -> None:
    """Where the child is, for the parent: one fixed-width line rewritten in place."""
    status.seek(0)
    status.write(f"{text:<12}\n")
    status.flush()


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    target = CLASSES[args.child](work)
    samples = target.samples()
    allowed = target.allowed()
    out = Path(args.out) / args.child
    out.mkdir(parents=True, exist_ok=True)
    status = open(work / "status", "w")
    seen: set[str] = set()
    for i in range(args.start, args.iterations):
        rng = random.Random(f"{args.seed}:{args.child}:{i}")
        data = target.mutate(samples, rng)
        (work / "current").write_bytes(data)
        _mark(status, str(i))
        try:
            target.run(data)
            continue
        except allowed as e:
            if not _bad_message(str(e)):
                continue
            kind, err = f"message of {type(e).__name__} not one inert line", e
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - a PanicException from Rust is a BaseException
            kind, err = type(e).__name__, e
        key = f"{kind} at {_where(err)}"
        if key in seen:
            continue
        seen.add(key)
        name = hashlib.sha1(key.encode()).hexdigest()[:10]
        (out / f"{name}.input").write_bytes(data)
        (out / f"{name}.txt").write_text(f"{key}\ninput {i} of seed {args.seed}\n{''.join(traceback.format_exception(err))}")
        print(f"[{args.child}] input {i}: {key}: {str(err)[:200]!r}", flush=True)
    _mark(status, "done")


# ---------------------------------------------------------------- the parent: one child per target, watched


def _rss_mb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def fuzz(name: str, args: argparse.Namespace) -> int:
    """Runs the target's inputs, restarting the child past one that hung or grew too large; returns findings."""
    start, began = args.start, time.monotonic()
    out = Path(args.out) / name
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        status = Path(work) / "status"
        while start < args.iterations:
            status.write_text("")
            command = [sys.executable, __file__, "--child", name, "--work", work, "--start", str(start),
                       "--iterations", str(args.iterations), "--seed", str(args.seed), "--out", args.out]  # fmt: skip
            proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
            last, changed, why = "", time.monotonic(), None
            while proc.poll() is None:
                time.sleep(0.2)
                now = status.read_text().strip()
                if now != last:
                    last, changed = now, time.monotonic()
                if _rss_mb(proc.pid) > args.max_rss_mb:
                    why = f"memory over {args.max_rss_mb} MB"
                elif now and now != "done" and time.monotonic() - changed > args.timeout:
                    why = f"no result within {args.timeout:g} s"
                if why:
                    proc.kill()
                    proc.wait()
            if last == "done":
                break
            if not last:
                print(f"[{name}] the child failed before its first input (status {proc.returncode})", flush=True)
                return 1
            i = int(last)
            why = why or f"the child died (status {proc.returncode})"
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(work) / "current", out / f"input-{i}.input")
            (out / f"input-{i}.txt").write_text(f"{why}\ninput {i} of seed {args.seed}\n")
            print(f"[{name}] input {i}: {why}", flush=True)
            start = i + 1
    print(f"[{name}] {args.iterations - args.start} inputs in {time.monotonic() - began:.0f} s", flush=True)
    return sum(1 for _ in out.glob("*.txt")) if out.is_dir() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--iterations", type=positive_int, default=1000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=nonnegative_int, default=0, help="the first input (to reproduce one)")
    parser.add_argument("--timeout", type=positive_float, default=20.0, help="seconds one input may take")
    parser.add_argument("--max-rss-mb", type=positive_int, default=3000)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "internvl-chat-fuzz"), help="findings go in a dated folder here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; use {', '.join(TARGETS)}")
    args.out = str(Path(args.out) / time.strftime("%Y%m%d-%H%M%S"))  # each run its own folder: nothing is overwritten
    findings = sum(fuzz(name, args) for name in names)
    print(f"{findings} finding(s)" + (f"; inputs and tracebacks in {args.out}" if findings else ""))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
