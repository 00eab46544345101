"""RemoteConversation against a real, unmodified engine: llama.cpp's llama-server on this CPU, serving
the embedded demo model converted to GGUF (`../shared/tools/llama-cpp`).

Skipped when the llama.cpp binaries are not built (`../shared/tools/llama-cpp build`, ~15 min once).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from internvl_chat.demo.scenes import make_scene
from internvl_chat.errors import RemoteError
from test_remote_app import app_env

REPO = Path(__file__).resolve().parents[1]
TOOL = Path(os.environ.get("INTERNVL_CHAT_LLAMA_CPP_TOOL", REPO.parent / "shared" / "tools" / "llama-cpp"))
DEMO_MODEL = REPO / "internvl_chat" / "demo_model"
CONTEXT = 4096
START_TIMEOUT_S = 300


def _binaries() -> Path | None:
    if not TOOL.is_file():
        return None
    found = subprocess.run(["bash", str(TOOL), "bin"], capture_output=True, text=True)
    folder = Path(found.stdout.strip()) if found.returncode == 0 else None
    return folder if folder and (folder / "llama-server").is_file() else None


BIN = _binaries()
pytestmark = pytest.mark.skipif(BIN is None, reason="llama.cpp is not built (../shared/tools/llama-cpp build)")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    converted = subprocess.run(["bash", str(TOOL), "convert", str(DEMO_MODEL), str(out)],
                               capture_output=True, text=True, timeout=1800)  # fmt: skip
    convert_log = out / "convert.log"  # where the tool sends the converter's own output
    assert converted.returncode == 0, (converted.stderr + (convert_log.read_text() if convert_log.exists() else ""))[-2000:]
    log = open(out / "server.log", "w")
    # port 0: it binds one the kernel picks, and says which; a port found free and closed first
    # (closed_port) could be taken by another process (a parallel test's server, a client's ephemeral
    # port) before llama-server bound it, and /health then asked whatever held it
    server = subprocess.Popen(
        [str(BIN / "llama-server"), "-m", str(out / "model.gguf"), "--mmproj", str(out / "mmproj.gguf"),
         "--host", "127.0.0.1", "--port", "0", "-t", "2", "-c", str(CONTEXT), "-np", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # readiness: the address it listens on is logged once the model is loaded
            assert server.poll() is None, (out / "server.log").read_text()[-2000:]
            if found := re.search(r"listening on (http://127\.0\.0\.1:\d+)\n", (out / "server.log").read_text()):
                url = found.group(1)
                break
            assert time.monotonic() < deadline, "llama-server did not become ready"
            time.sleep(0.25)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        yield url + "/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    make_scene(7, easy=True).render().save(path)  # near-square: one 448 tile for InternVL
    return path


def system_message() -> str:
    return json.loads((DEMO_MODEL / "config.json").read_text())["system_message"]


def connect(url: str, **kwargs) -> RemoteConversation:
    params = SamplingParams(max_new_tokens=kwargs.pop("max_new_tokens", 12))
    return RemoteConversation.connect(url, params=params, system_message=system_message(), **kwargs)


def test_an_image_conversation_with_llama_server_reuses_its_cache(llama_server, scene):
    conv = connect(llama_server)
    assert conv.dialect == "llamacpp" and conv.max_context == CONTEXT
    first = list(conv.ask("How many shapes are there?", [conv.describe_image(scene)]))[-1]
    assert first["finish_reason"] in ("stop", "length") and conv.turns[0].reply.strip()
    prompt1 = first["usage"]["prompt_tokens"]
    assert prompt1 > 256  # the picture's tokens are in the prompt
    second = list(conv.ask("What colour is the biggest shape?"))[-1]
    # the same greedy answers as the local engine: llama.cpp saw InternVL's own prompt (one tile,
    # `<image>\n` before the question, the reply resent as returned)
    local = Session(load_model(DEMO_MODEL, device="cpu", dtype="float32", max_context=CONTEXT),
                    params=conv.params, system_message=system_message())  # fmt: skip
    list(local.ask("How many shapes are there?", [local.describe_image(scene)]))
    list(local.ask("What colour is the biggest shape?"))
    assert [t.reply for t in conv.turns] == [t.answer_text for t in local.turns]
    server = second["timing"]["server"]
    # the whole first turn was resent byte for byte, so llama.cpp reuses its cache for it
    assert server["cached_tokens"] >= prompt1
    assert server["prompt_tokens"] > prompt1 and second["timing"]["ttft_s"] > 0
    print(f"\nllama-server: turn 1 {conv.turns[0].reply!r} ({prompt1} prompt tokens); "
          f"turn 2 {conv.turns[1].reply!r}: {server['prompt_tokens']} prompt tokens, {server['cached_tokens']} cached, "
          f"server decode {server.get('predicted_per_second', 0):.0f} tok/s, "
          f"client ttft {second['timing']['ttft_s'] * 1000:.0f} ms")  # fmt: skip


def test_cancel_and_errors_against_llama_server(llama_server):
    conv = connect(llama_server, max_new_tokens=48)
    cancel = threading.Event()
    events = conv.ask("Describe the picture in detail.", cancel=cancel)
    next(events)
    cancel.set()
    assert list(events)[-1]["finish_reason"] == "cancelled"
    partial = conv.turns[0].reply
    with pytest.raises(RemoteError, match=r"^this turn and its answer do not fit the server's ([\d,]+-token )?context "
                       r"\(the server said: .+\); ") as err:
        list(conv.ask("word " * (CONTEXT + 500)))
    assert "\n" not in str(err.value) and len(conv.turns) == 1
    list(conv.ask("Thanks."))
    assert conv.turns[0].reply == partial and len(conv.turns) == 2


def test_a_repetition_penalty_is_taken_by_llama_server(llama_server):
    """llama-server refused `repeat_last_n: -1` with a 400 on every turn that had a penalty."""
    conv = connect(llama_server)
    final = list(conv.ask("Describe the picture in detail.",
                          params=SamplingParams(max_new_tokens=12, repetition_penalty=1.3)))[-1]  # fmt: skip
    assert final["finish_reason"] in ("stop", "length") and conv.turns[0].reply.strip()


def test_a_seeded_answer_from_llama_server_is_the_same_every_time(llama_server):
    """The largest seed the app takes (2**63-1) was llama.cpp's "random seed" once cut to 32 bits."""
    params = SamplingParams(max_new_tokens=16, temperature=1.5, seed=2**63 - 1)
    replies = set()
    for _ in range(3):
        conv = connect(llama_server)
        list(conv.ask("Describe the picture in detail.", params=params))
        replies.add(conv.turns[0].reply)
    assert len(replies) == 1


def test_video_frames_reach_llama_server_as_internvls_own_prompt(llama_server, tmp_path):
    """Frames go as 448×448 pictures behind `FrameK: ` labels: llama.cpp counts exactly the prompt
    tokens our template makes, and answers as the local engine does."""
    from media_helpers import write_numbered_video

    video = write_numbered_video(tmp_path / "clip.mp4", 24)
    conv = connect(llama_server)
    final = list(conv.ask("How many shapes are there?", [conv.describe_video(video, 3)]))[-1]
    local = Session(load_model(DEMO_MODEL, device="cpu", dtype="float32", max_context=CONTEXT),
                    params=conv.params, system_message=system_message())  # fmt: skip
    list(local.ask("How many shapes are there?", [local.describe_video(video, 3)]))
    assert final["usage"]["prompt_tokens"] == len(local.turns[0].prompt_ids)
    assert conv.turns[0].reply == local.turns[0].answer_text


# ---- the terminal app against llama-server: one-shot and the REPL -----------------------------


def test_the_app_one_shot_through_llama_server_answers_as_the_local_model(llama_server, scene, tmp_path):
    ask = ["--image", str(scene), "-p", "How many shapes are there?", "--max-new-tokens", "12", "--json"]
    # llama.cpp's chat template has no default system message: send the model's own, as the local app does
    remote = ["--server", llama_server, "--system", system_message()]
    runs = [subprocess.run([sys.executable, "-m", "internvl_chat.cli", *flags, *ask], capture_output=True, text=True,
                           env=app_env(tmp_path), timeout=600, cwd=tmp_path)
            for flags in (remote, ["--model", str(DEMO_MODEL), "--max-context", str(CONTEXT)])]  # fmt: skip
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    there, here = (json.loads(run.stdout) for run in runs)
    assert there["token_ids"] is None and there["text"] == here["text"] and there["text"].strip()
    assert there["usage"]["prompt_tokens"] == here["usage"]["prompt_tokens"]  # InternVL's own prompt, token for token
    assert {"prompt_ms", "predicted_per_second"} <= set(there["timing"]["server"])
    print(f"\napp one-shot via llama-server: {there['text']!r} (local: {here['text']!r}), "
          f"{there['usage']['prompt_tokens']} prompt tokens")


def test_the_app_repl_through_llama_server(llama_server, scene, tmp_path):
    import pexpect

    from test_repl_pty import INPUT_DONE, PROMPT_READY

    env = {**app_env(tmp_path), "TERM": "xterm-256color", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "internvl_chat.cli", "--server", llama_server, "--plain",
                                           "--max-new-tokens", "12", "--system", system_message()],
                          env=env, dimensions=(50, 200), encoding="utf-8", timeout=600, cwd=str(tmp_path))  # fmt: skip

    def run(line: str, pattern: str) -> str:
        child.send(line + "\r")
        child.expect_exact(INPUT_DONE)
        child.expect(pattern)
        found = child.match.group(0)
        child.expect_exact(PROMPT_READY)
        return found

    child.expect(r"internvl-chat · \S+ · http://127\.0\.0\.1:\d+/v1 \(llama\.cpp\) · context 4,096 tokens")
    child.expect_exact(PROMPT_READY)
    run(f"/image {scene}", r"\+ image scene\.png \d+×\d+ → 1 tile · ≈259 tokens")
    stats = r"ttft [\d.]+ s · decode [\d.,]+ tok/s \(server\) · context ≈[\d,]+/4,096 \(\d+ %\) · server: prompt [\d,]+ tok \([\d,]+ cached\)"
    run("How many shapes are there?", stats)
    second = run("What colour is the biggest shape?", stats)
    assert int(re.search(r"\(([\d,]+) cached\)", second).group(1).replace(",", "")) > 256  # the picture came from its cache
    run("/stats", r"server reports\s+prompt [\d,]+ tokens · [\d,]+ cached · answer [\d,]+ tokens · prompt [\d,]+ ms")
    run(f"/save {tmp_path / 'talk.json'}", r"saved 2 turns")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert saved["backend"]["dialect"] == "llamacpp" and all(m["text"].strip() for m in saved["messages"][1::2])


def test_the_tiles_llama_server_makes_of_a_picture_are_the_estimates(llama_server, tmp_path):
    """llamacpp_tiles against the engine itself, on sizes where double-precision arithmetic picked
    another grid than llama.cpp's single-precision one (4276×4275: 13 estimated, 10 made)."""
    from PIL import Image

    from internvl_chat.chat.dialects import llamacpp_tiles

    def prompt_tokens(media) -> tuple[int, int]:
        """(the prompt's tokens as the server counts them, the client's estimate of the media's)"""
        conv = connect(llama_server, max_new_tokens=1)
        described = [conv.describe_image(m) for m in media]
        list(conv.ask("Hi.", described))
        return conv.turns[0].usage["prompt_tokens"], conv.media_tokens(described)

    text_only, _ = prompt_tokens([])
    for size, tiles in [((640, 400), 3), ((4276, 4275), 10), ((2723, 5448), 11)]:
        path = tmp_path / f"{size[0]}x{size[1]}.jpg"
        Image.new("RGB", size, (200, 30, 30)).save(path, quality=50)
        counted, estimated = prompt_tokens([path])
        assert llamacpp_tiles(*size) == tiles and counted - text_only == estimated, (size, counted - text_only, estimated)
