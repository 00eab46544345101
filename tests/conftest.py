"""Shared fixtures: tiny checkpoints (random weights, same seed) built once per test session, and the
tiny model loaded, or served, once per test module (a module with its own fixture of the name overrides it)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "scripts", REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

TINY_SEED = 0

# Shells start background jobs (CI runners, nohup) with SIGINT ignored, and child processes inherit
# that; the Ctrl-C tests need Python's own handler here and the default disposition in children.
signal.signal(signal.SIGINT, signal.default_int_handler)

# pytest-xdist workers export COLUMNS=80 and LINES=24, which would override the size of every
# pseudo-terminal the app is started in (rich and prompt_toolkit read them first).
for name in ("COLUMNS", "LINES"):
    os.environ.pop(name, None)


@pytest.fixture
def fixed_home(monkeypatch) -> None:
    """HOME is /home/tester, so what ~ expands to is known (modules opt in with usefixtures)."""
    monkeypatch.setenv("HOME", "/home/tester")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A folder holding only the tiny byte-level BPE tokenizer."""
    from make_tiny_checkpoint import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(out)
    return out


def _tiny(tmp_path_factory, tokenizer_dir: Path, name: str, **kwargs) -> Path:
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp(name), seed=TINY_SEED, tokenizer_dir=tokenizer_dir, **kwargs
    )


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory, tiny_tokenizer) -> Path:
    """Original OpenGVLab layout, InternViT-300M style, bf16 single safetensors."""
    return _tiny(tmp_path_factory, tiny_tokenizer, "tiny_original", layout="original", vit="300m")


@pytest.fixture(scope="session")
def tiny_original_6b(tmp_path_factory, tiny_tokenizer) -> Path:
    """Original layout, InternViT-6B style (RMSNorm, q/k norm, no qkv bias)."""
    return _tiny(tmp_path_factory, tiny_tokenizer, "tiny_original_6b", layout="original", vit="6b")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_tokenizer) -> Path:
    """-hf layout, new prefixes (model.language_model.*); same weights as tiny_original."""
    return _tiny(tmp_path_factory, tiny_tokenizer, "tiny_hf", layout="hf", vit="300m", prefix_style="new")


@pytest.fixture(scope="session")
def tiny_hf_legacy(tmp_path_factory, tiny_tokenizer) -> Path:
    """-hf layout, legacy prefixes (language_model.model.*, as save_pretrained writes in transformers 5.24)."""
    return _tiny(tmp_path_factory, tiny_tokenizer, "tiny_hf_legacy", layout="hf", vit="300m", prefix_style="legacy")


@pytest.fixture(scope="module")
def loaded(tiny_original):
    """The tiny model on the CPU in float32 with a 2048-token context, loaded once per test module
    (its KV cache is shared only by that module's tests); a module that needs another loads its own."""
    from internvl_chat.engine.loader import load_model

    return load_model(tiny_original, device="cpu", dtype="float32", max_context=2048)


@pytest.fixture(scope="module")
def server(tiny_original):
    """An in-process `serve` of the tiny model, 2 slots and a queue 8 deep, one per test module
    (serve_support.crowd puts that depth back); a module that needs other limits starts its own."""
    from serve_support import RunningServer

    with RunningServer(tiny_original, queue_depth=8, slots=2) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    """The `openai` client of the module's `server` (its own fixture, where it has one)."""
    return server.client()


@pytest.fixture(scope="module")
def builder(server):
    """The PromptBuilder of the module's `server`: the prompts it builds, to check ids against."""
    return server.prompt_builder()


@pytest.fixture(scope="module")
def tiny_loaded_tokenizer(tiny_tokenizer: Path):
    """The project's tiny tokenizer (GPT-2-style split), loaded the way the app loads one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(params=["qwen_like", "tiny_loaded"])
def tokenizer(request: pytest.FixtureRequest):
    """Both test tokenizers in turn; a module using it defines `qwen_like_tokenizer`."""
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture(autouse=True)
def _close_remote_clients(monkeypatch):
    """Every remote client a test made is closed when it ends: the tests drop their conversations
    unclosed, and the pooled connection each holds was then closed by the garbage collector, with a
    ResourceWarning (the app's conversation lives as long as its process)."""
    remote_http = sys.modules.get("internvl_chat.chat.remote_http")  # imported by the remote tests only
    if remote_http is None:
        yield
        return
    made = []
    init = remote_http.ApiClient.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(remote_http.ApiClient, "__init__", tracked)
    yield
    for client in made:
        client.close()


@pytest.fixture
def kept_connections(monkeypatch):
    """For a test that counts how often a pooled connection is reused: on a loaded machine a pause
    between turns past remote_http.KEEPALIVE_S (4 s), a read of a body's end past
    remote_stream.DRAIN_S (1 s), or of what follows a finish_reason past FINISHED_GRACE_S (3 s, the
    reader stalled with [DONE] already in its buffer), closed it, and the count was off by one."""
    from internvl_chat.chat import remote, remote_http, remote_stream

    monkeypatch.setattr(remote_http, "KEEPALIVE_S", 600.0)
    monkeypatch.setattr(remote_stream, "DRAIN_S", 600.0)
    monkeypatch.setattr(remote, "FINISHED_GRACE_S", 600.0)
