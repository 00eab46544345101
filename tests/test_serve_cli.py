"""`internvl-chat serve` as a user starts it: a subprocess on a free port, bearer key, clean Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 120


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}


def test_serve_subcommand_serves_with_a_key_and_stops_on_ctrl_c(tiny_original):
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(tiny_original), "--port", "0",
         "--api-key", "k3y", "--device", "cpu", "--dtype", "float32", "--max-context", "2048", "--log-level", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=WAIT_S)
            found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
            url = found and found.group(1)
        assert "2,048 tokens" in line and "network" not in line  # bound to loopback: no warning

        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=WAIT_S)
        model = client.models.list().data[0].id
        assert model == tiny_original.name
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_without_a_model_says_what_to_do():
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "serve"], capture_output=True, text=True,
                         env=_env(), timeout=WAIT_S, stdin=subprocess.DEVNULL)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["internvl-chat: error: serve needs a model: pass --model DIR "
                                               "(e.g. --model internvl_chat/demo_model)"]  # fmt: skip


def test_serve_compile_flag_reaches_the_model_settings():
    """`serve --compile MODE` sets model.compile, which serve() passes to load_model; a bad mode is refused."""
    from internvl_chat.errors import UsageError
    from internvl_chat.serve.main import _overrides, build_parser
    from internvl_chat.settings import load_settings

    args = build_parser().parse_args(["--model", "m", "--compile", "on"])
    assert load_settings(os.devnull, {}, _overrides(args)).model.compile == "on"
    with pytest.raises(UsageError):
        load_settings(os.devnull, {}, _overrides(build_parser().parse_args(["--compile", "sometimes"])))
