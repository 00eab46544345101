"""An in-process `internvl-chat serve` on 127.0.0.1 (uvicorn in a thread) for the serve tests and benchmark."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from pathlib import Path

import uvicorn

from internvl_chat.chat.template import PromptBuilder
from internvl_chat.engine.loader import load_model
from internvl_chat.serve.app import create_app
from internvl_chat.serve.engine import EngineWorker
from internvl_chat.serve.main import listen_socket, uvicorn_config
from internvl_chat.serve.options import ServeOptions
from internvl_chat.settings import load_settings

START_TIMEOUT_S = 120


class RunningServer:
    """The app on a free port; `worker` is the engine (its hooks and counters are the tests' window)."""

    def __init__(self, model_dir: Path, max_context: int = 4096, model_id: str = "tiny", **serve: object):
        overrides = {f"serve.{k}": v for k, v in serve.items()}
        settings = load_settings(os.devnull, env={}, overrides=overrides)
        self.options = ServeOptions.from_settings(settings)
        self.loaded = load_model(model_dir, device="cpu", dtype="float32", max_context=max_context)
        self.worker = EngineWorker(self.loaded, self.options)
        self.model_id = model_id
        self.app = create_app(self.worker, model_id)
        self.sock = listen_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, self.options, "warning", graceful_s=2)  # the limits `serve` has
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def prompt_builder(self) -> PromptBuilder:
        """The app's own prompt builder for the served model (token counts the server must match)."""
        return PromptBuilder(self.loaded.tokenizer, self.loaded.config.system_message, self.loaded.config.tokens_per_tile)

    def __enter__(self) -> RunningServer:
        self.worker.start()
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:  # uvicorn sets this flag once it listens
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.worker.stop()
        self.sock.close()

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kw)


def crowd(server: RunningServer, visitor, count: int, queue_depth: int, join_s: float) -> None:
    """Run `visitor(n)` for n < count on threads all at once against a queue `queue_depth` deep,
    then put the fixture's depth (8) back."""
    server.options.queue_depth = queue_depth
    threads = [threading.Thread(target=visitor, args=(n,)) for n in range(count)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(join_s)
    finally:
        server.options.queue_depth = 8


def chat_body(text: str, **kw) -> dict:
    """A greedy chat-completions request for the test server's model: one user message `text`; `kw` adds fields."""
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def png_bytes(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_frames_url(frames) -> str:
    """vLLM's pre-sampled video form: data:video/jpeg;base64,F1,F2,…"""
    from PIL import Image

    texts = []
    for rgb in frames:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        texts.append(base64.b64encode(buf.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(texts)


def wait_until(condition, what: str, wait_s: float = 60) -> None:
    """Poll a marker the server sets (bounded: a hang fails the test instead of blocking the run)."""
    pause = threading.Event()
    for _ in range(int(wait_s * 100)):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError(f"timed out waiting until {what}")
