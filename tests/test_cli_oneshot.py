"""One-shot CLI: --json greedy ids equal transformers' generate; exit codes; stdout holds only the answer."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_chat.chat.template import MediaSpec, PromptBuilder
from internvl_chat.engine.tokenizer import load_tokenizer
from internvl_chat.media.image import load_image
from media_helpers import textured_rgb
from reference import reference_model

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "internvl_chat.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(path)  # 2×1 grid + thumbnail: 3 tiles
    return path


def test_json_greedy_ids_match_transformers_generate(tiny_original, image):
    question = "What is in the picture?"
    run = cli("--model", str(tiny_original), "--image", str(image), "-p", question, "--json",
              "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32")  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert set(out) == {"text", "token_ids", "finish_reason", "usage", "timing", "note"}
    assert out["note"] is None  # one schema with a server's answer: a local one is never cut by the client
    assert {"load_s", "vision_s", "prefill_s", "decode_tokens_per_s"} <= set(out["timing"])
    assert out["finish_reason"] in ("stop", "length")

    tokenizer = load_tokenizer(tiny_original)
    pixels = load_image(image).pixel_values
    assert pixels.shape[0] == 3
    builder = PromptBuilder(tokenizer, json.loads((tiny_original / "config.json").read_text()).get("system_message")
                            or __import__("internvl_chat.engine.config", fromlist=["x"]).DEFAULT_SYSTEM_MESSAGE)  # fmt: skip
    prompt = builder.first_turn(question, [MediaSpec("image", 3)])
    assert out["usage"]["prompt_tokens"] == len(prompt)
    ref = reference_model(tiny_original)
    stops = list(builder.stop_ids)
    with torch.no_grad():
        gen = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=12,
                           do_sample=False, eos_token_id=stops, pad_token_id=stops[0])  # fmt: skip
    expected = gen[0, len(prompt) :].tolist()
    if expected and expected[-1] in stops:
        expected = expected[:-1]
    assert out["token_ids"] == expected
    assert out["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_stdout_holds_only_the_answer_and_stdin_is_prepended(tiny_original):
    run = cli("--model", str(tiny_original), "-p", "Summarise.", "--max-new-tokens", "5", "--device", "cpu",
              stdin="Some piped document text.\n")  # fmt: skip
    assert run.returncode == 0, run.stderr
    json_run = cli("--model", str(tiny_original), "--max-new-tokens", "5", "--device", "cpu", "--json",
                   "-p", "Summarise.", stdin="Some piped document text.\n")  # fmt: skip
    out = json.loads(json_run.stdout)
    assert run.stdout == out["text"] + "\n"
    assert "decode" in run.stderr  # the stats line goes to stderr
    alone = cli("--model", str(tiny_original), "--max-new-tokens", "5", "--device", "cpu", "--json", "-p", "Summarise.")
    assert json.loads(alone.stdout)["usage"]["prompt_tokens"] < out["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model", "-p", "hi"], "does not exist"),
        (["--image", "/nonexistent.png", "-p", "hi"], "nonexistent.png"),
        (["--image", "", "-p", "hi"], "--image was given an empty path"),  # was "'.' is a folder"
        (["--video", " ", "-p", "hi"], "--video was given an empty path"),
        (["--config", "", "-p", "hi"], "--config was given an empty path"),  # was "config file . is a folder"
        (["--script", ""], "--script was given an empty path"),  # was "no prompt given"
        (["--model", "", "-p", "hi"], "--model was given an empty path"),  # the demo model answered
        (["--server", "", "-p", "hi"], "--server was given an empty URL"),  # `--server "$URL"`: the local model answered
        (["--video-range", "", "-p", "hi"], "invalid time range ''"),  # `--video-range "$R"`: the whole video was sampled
        (["-p", "hi", "--temperature", "-1"], "temperature"),
        (["-p", "hi", "--device", "tpu"], "device"),
        # `~user` of an account that does not exist: refused, not a folder named so
        (["--image", "~no-such-user-internvl-chat/a.png", "-p", "hi"], "there is no user"),
        (["--video", "~no-such-user-internvl-chat/a.mp4", "-p", "hi"], "there is no user"),
        (["--model", "~no-such-user-internvl-chat/model", "-p", "hi"], "there is no user"),
        # a name longer than the file system allows (stat fails with ENAMETOOLONG, not ENOENT)
        (["--image", "x" * 300 + ".png", "-p", "hi"], "the path is too long for the file system"),
        (["--video", "x" * 300 + ".mp4", "-p", "hi"], "the path is too long for the file system"),
        (["--model", "x" * 300, "-p", "hi"], "File name too long"),
        # a web address as typed: as a Path its "//" was one "/" ("https:/huggingface.co/…")
        (["--model", "https://huggingface.co/OpenGVLab/InternVL3-2B", "-p", "hi"],
         "model folder https://huggingface.co/OpenGVLab/InternVL3-2B does not exist; "),
        (["--model", "https://example.com/model", "-p", "hi"],
         "model folder https://example.com/model does not exist; pass --model with a checkpoint folder"),
        (["--config", "https://example.com/chat.toml", "-p", "hi"],
         "config file https://example.com/chat.toml is a web address; internvl-chat reads local files only"),
        (["--script", "https://example.com/chat.txt"], "https://example.com/chat.txt is a web address; "),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_original, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_original), *args]
    run = cli(*args)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert run.stdout == ""


def test_a_prompt_that_is_only_a_missing_media_path_is_not_sent(tiny_original, tmp_path):
    # the model was asked "/…/cat.png": a mistyped picture's path alone became the question
    run = cli("--model", str(tiny_original), "--max-new-tokens", "2", "-p", str(tmp_path / "cat.png"))
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr == (f"internvl-chat: error: {tmp_path / 'cat.png'} does not exist, so the message, only its "
                          "path, was not sent; check the path\n")  # fmt: skip


def test_a_path_too_long_for_the_file_system_in_the_prompt_stays_text(tiny_original):
    run = cli("--model", str(tiny_original), "--max-new-tokens", "2", "-p", f"look at /tmp/{'x' * 300}.png")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert "does not exist, so it was not attached" in run.stderr


def test_corrupt_checkpoint_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    run = cli("--model", str(tmp_path), "-p", "hi")
    assert run.returncode == 2
    assert "text-only language model" in run.stderr


def test_a_qoi_named_in_the_prompt_is_attached(tiny_original, tmp_path):
    # `-p "describe /tmp/x.qoi"` sent the path as text, without a word: a message's paths knew 8 image extensions
    Image.fromarray(textured_rgb(448, 448, seed=4)).save(tmp_path / "x.qoi")  # 1 tile
    base = ["--model", str(tiny_original), "--max-new-tokens", "2", "--device", "cpu", "--json", "-p"]
    named = cli(*base, f"describe {tmp_path / 'x.qoi'}")
    assert named.returncode == 0 and named.stderr == "", named.stderr
    text_only = cli(*base, "describe")
    # the path left the text and the picture came in: <img> + 256 × <IMG_CONTEXT> + </img>
    assert json.loads(named.stdout)["usage"]["prompt_tokens"] - json.loads(text_only.stdout)["usage"]["prompt_tokens"] >= 258


def test_video_flags(tiny_original, tmp_path):
    from media_helpers import write_numbered_video

    clip = write_numbered_video(tmp_path / "clip.mp4", num_frames=30)
    base = ["--model", str(tiny_original), "--max-new-tokens", "3", "--device", "cpu", "--json", "-p", "What happens?"]
    whole = json.loads(cli(*base, "--video", str(clip), "--frames", "3").stdout)
    text_only = json.loads(cli(*base).stdout)
    # each frame is one <image>: <img> + 256 × <IMG_CONTEXT> + </img>, plus its "FrameN: " label
    assert whole["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] >= 3 * 258
    ranged = cli(*base, "--video", str(clip), "--frames", "2", "--video-range", "0.2-0.6")
    assert ranged.returncode == 0, ranged.stderr
    bad = cli(*base, "--video", str(clip), "--video-range", "5-9")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_video_cut_short_is_noted_on_stderr(tiny_original, tmp_path):
    from media_helpers import cut_at_frame, faststart_copy, write_numbered_video

    whole = faststart_copy(write_numbered_video(tmp_path / "clip.mp4", num_frames=30), tmp_path / "whole.mp4")
    cut = cut_at_frame(whole, tmp_path / "cut.mp4", 12)
    run = cli("--model", str(tiny_original), "--max-new-tokens", "2", "--device", "cpu", "--json", "-p", "What happens?",
              "--video", str(cut), "--frames", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["finish_reason"] in ("stop", "length")
    assert f"internvl-chat: note: {cut} holds only 12 of the 30 frames its header lists (0.4 s of 1.0 s)" in run.stderr



def test_an_mkv_cut_short_is_noted_on_stderr(tiny_original, tmp_path):
    """MKV stores no frame count: where its frames end is told against the duration its header keeps."""
    from media_helpers import cut_at_frame, write_numbered_video

    cut = cut_at_frame(write_numbered_video(tmp_path / "clip.mkv", num_frames=30), tmp_path / "cut.mkv", 12)
    run = cli("--model", str(tiny_original), "--max-new-tokens", "2", "--device", "cpu", "--json", "-p", "What happens?",
              "--video", str(cut), "--frames", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"internvl-chat: note: {cut} ends at 0.4 s of the 1.0 s its header lists (12 frames)" in run.stderr

# --- untrusted input and broken output streams --------------------------------------------------


def _one_line(run: subprocess.CompletedProcess, code: int, expected: str) -> None:
    assert run.returncode == code, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_stdin_that_is_not_text_is_refused_with_what_to_do(tiny_original, image):
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "-p", "hi"],
                         input=b"caf\xe9 au lait\n", capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull})  # fmt: skip
    assert run.returncode == 2 and b"stdin is not UTF-8 text (byte 0xe9 on line 1)" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    png = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "-p", "hi"],
                         input=image.read_bytes(), capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull})  # fmt: skip
    assert png.returncode == 2, png.stderr
    assert png.stderr.decode().strip() == (
        "internvl-chat: error: stdin holds a PNG image, not text; pass it with --image FILE (the question goes in -p TEXT)"
    )
    wide = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "-p", "hi"],
                          input="Summarise this.\n".encode("utf-16"), capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull})  # fmt: skip
    assert wide.returncode == 2 and wide.stderr.decode().strip() == (  # it said "binary data … pass it with a text file"
        "internvl-chat: error: stdin is UTF-16 text, not UTF-8; save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"
    )


def test_a_mistyped_flag_is_one_inert_line_not_the_usage_block():
    # argparse printed its whole usage block, and an unknown flag as typed: its escape sequence
    # reached the terminal (this one clears the screen)
    _one_line(cli("--frames", "many", "-p", "hi"), 2, "argument --frames: invalid int value: 'many'; see internvl-chat --help")
    run = cli("--x\x1b[2Jy", "-p", "hi")
    _one_line(run, 2, "unrecognized arguments: --x\\e[2Jy; see internvl-chat --help")
    assert "\x1b" not in run.stderr
    _one_line(cli("serve", "--port", "eighty"), 2, "invalid int value: 'eighty'; see internvl-chat serve --help")


def test_a_prompt_argument_that_is_not_utf8_is_refused(tiny_original):
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "-p", b"caf\xe9"],
                         capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull})  # fmt: skip
    assert run.returncode == 2 and run.stdout == b""
    assert run.stderr.decode().strip().startswith("internvl-chat: error: the prompt is not UTF-8 text (byte 0xe9)")


def test_a_missing_demo_model_says_how_to_get_it_back(tmp_path, monkeypatch):
    from internvl_chat.errors import UsageError
    from internvl_chat.settings import Settings
    from internvl_chat.ui import setup

    (tmp_path / ".git").mkdir()  # a checkout: <repo>/internvl_chat/demo_model
    monkeypatch.setattr(setup, "EMBEDDED_MODEL", tmp_path / "internvl_chat" / "demo_model")
    with pytest.raises(UsageError) as err:
        setup.resolve_model_path(Settings())
    assert "make demo" not in str(err.value)  # it once said so, but make demo stops on a missing model too
    assert "--model DIR" in str(err.value) and "git checkout internvl_chat/demo_model" in str(err.value)


def test_a_missing_demo_model_in_an_installed_package_is_not_sent_to_git(tmp_path, monkeypatch):
    # pip install . puts the package in site-packages: no repository there for `git checkout` to restore from
    from internvl_chat.errors import UsageError
    from internvl_chat.settings import Settings
    from internvl_chat.ui import setup

    site_packages = tmp_path / "lib" / "python3.11" / "site-packages"
    monkeypatch.setattr(setup, "EMBEDDED_MODEL", site_packages / "internvl_chat" / "demo_model")
    with pytest.raises(UsageError) as err:
        setup.resolve_model_path(Settings())
    assert "--model DIR" in str(err.value) and "reinstall internvl-chat" in str(err.value)
    assert "git" not in str(err.value)


def test_seed_outside_the_generators_range_is_refused_when_given(tiny_original):
    _one_line(cli("--model", "/nonexistent/model", "-p", "hi", "--seed", str(2**64)), 2,
              "--seed: must be an integer from 0 to 2**63-1")  # refused before the model is read; names the flag typed
    _one_line(cli("--model", str(tiny_original), "-p", "hi", "--seed", "-1"), 2, "--seed: ")
    top = cli("--model", str(tiny_original), "-p", "hi", "--seed", str(2**63 - 1), "--temperature", "0.7",
              "--max-new-tokens", "3", "--device", "cpu")  # fmt: skip
    assert top.returncode == 0, top.stderr


def test_a_full_stdout_ends_with_one_line_and_status_1(tiny_original, tmp_path):
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "-p", "hi",
                              "--max-new-tokens", "4", "--device", "cpu"], stdout=full, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull})  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip() == "internvl-chat: error: cannot write to stdout (No space left on device); the output is incomplete"


def test_a_closed_stdout_is_an_error_not_a_lost_answer(tiny_original, tmp_path):
    # `>&-`: the answer went to the /dev/null put on fd 1 and the status was 0; now writing fails
    # as `echo hi >&-` does, and a script still runs to its end (its /save is written)
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    base = [sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "4"]
    saved = tmp_path / "chat.json"
    script = tmp_path / "chat.txt"
    script.write_text(f"Hello.\n/save {saved}\n")
    for args in (["-p", "hi"], ["-p", "hi", "--json"], ["--script", str(script)]):
        run = subprocess.run([*base, *args], stdout=None, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             preexec_fn=lambda: os.close(1), env=env, timeout=300)  # fmt: skip
        assert run.returncode == 1, args
        assert run.stderr.strip() == "internvl-chat: error: cannot write to stdout (stdout is closed); the output is incomplete"
    assert json.loads(saved.read_text())["format"] == "internvl-chat-session"


def test_a_closed_stderr_costs_nothing_and_never_reaches_stdout(tiny_original, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    base = [sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu"]
    close_stderr = lambda: os.close(2)  # noqa: E731  as `2>&-` does
    ok = subprocess.run([*base, "-p", "hi", "--max-new-tokens", "4", "--json"], stdout=subprocess.PIPE,
                        stdin=subprocess.DEVNULL, preexec_fn=close_stderr, env=env, timeout=300)  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)["finish_reason"] in ("stop", "length")
    bad = subprocess.run([*base, "-p", "hi", "--temperature", "-1"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         preexec_fn=close_stderr, env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == b""  # the error went nowhere, not into stdout

    script = tmp_path / "chat.txt"
    saved = tmp_path / "chat.json"
    script.write_text(f"Hello.\n/save {saved}\n")
    run = subprocess.run([*base, "--max-new-tokens", "4", "--script", str(script)], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, preexec_fn=close_stderr, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0 and b"saved 1 turn " in run.stdout
    assert json.loads(saved.read_text())["format"] == "internvl-chat-session"  # fd 2 reused by nothing


def test_the_tokenizers_own_warnings_never_reach_the_user(tiny_original, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_original.iterdir():
        (model / item.name).symlink_to(item)
    (model / "tokenizer_config.json").unlink()
    config = json.loads((tiny_original / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 16}))
    run = cli("--model", str(model), "--max-new-tokens", "2", "--device", "cpu", "-p", "Summarise.",
              stdin="one two three four five six seven eight nine ten " * 10)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Token indices" not in run.stderr and "transformers" not in run.stderr
    lines = run.stderr.strip().splitlines()  # the answer cut at 2 tokens, and the stats line: nothing else
    assert len(lines) == 2 and lines[0].startswith("internvl-chat: warning: the answer stopped at --max-new-tokens"), run.stderr


def test_python_dash_m_runs_the_app():
    # a checkout used without `pip install` runs as `python -m internvl_chat`
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-m", "internvl_chat", "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("internvl-chat ")


class _Terminal:
    """stdin or stdout as a terminal, for cli.run's choice of mode."""

    def isatty(self) -> bool:
        return True


def test_json_never_opens_the_repl_where_it_would_be_dropped(monkeypatch):
    # with -I, or with no prompt on a terminal, the REPL ran and printed text: --json was dropped silently
    from internvl_chat import cli as cli_module
    from internvl_chat.errors import UsageError
    from internvl_chat.ui import repl

    monkeypatch.setattr(repl, "run_repl", lambda *a: pytest.fail("the REPL ran"))
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(sys, "stdout", _Terminal())
    monkeypatch.setenv("INTERNVL_CHAT_CONFIG", os.devnull)
    with pytest.raises(UsageError, match="--json prints one answer as JSON, but -I goes on in the REPL"):
        cli_module.run(["--json", "-I", "-p", "hi"])
    with pytest.raises(UsageError, match="no prompt given"):
        cli_module.run(["--json"])


def test_a_script_read_from_a_terminal_is_refused_as_a_prompt_read_from_one_is(monkeypatch):
    # `--script -` at a terminal waited, without a word, for a script typed until Ctrl-D (`-p -` is refused there)
    from internvl_chat import cli as cli_module
    from internvl_chat.errors import UsageError
    from internvl_chat.ui import script

    monkeypatch.setattr(script, "run_script", lambda *a, **k: pytest.fail("the script ran"))
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setenv("INTERNVL_CHAT_CONFIG", os.devnull)
    with pytest.raises(UsageError, match=r"^--script - reads the script from stdin, but stdin is a terminal; pipe the script in"):
        cli_module.run(["--script", "-"])


def test_an_answer_cut_at_the_length_limit_is_said_on_stderr(tiny_original):
    # stdout held the cut answer, exit 0, and nothing anywhere (--no-stats) said it was not whole
    run = cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "1", "--no-stats", "-p", "Tell me a story.")
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    assert run.stderr == ("internvl-chat: warning: the answer stopped at --max-new-tokens (1); "
                          "a larger --max-new-tokens allows a longer one\n")  # fmt: skip
    as_json = cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "1", "--json", "-p", "Tell me a story.")
    assert json.loads(as_json.stdout)["finish_reason"] == "length" and as_json.stderr == ""  # finish_reason says it
    prompt = json.loads(as_json.stdout)["usage"]["prompt_tokens"]
    full = cli("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "3", "--max-context", str(prompt + 3),
               "--no-stats", "-p", "Tell me a story.")  # fmt: skip
    assert full.returncode == 0, full.stderr
    assert full.stderr == (f"internvl-chat: warning: the answer stopped where the {prompt + 3:,}-token context is full; "
                           "a larger --max-context makes room\n")  # fmt: skip


class _SignalledAnswer:
    """A conversation without a model whose answer is stopped by `signum`, sent once it has begun."""

    def __init__(self, signum: int):
        self.signum = signum
        self.turns: list = []

    def ask(self, prompt, media, params=None, cancel=None):
        import signal
        import time
        from types import SimpleNamespace

        yield {"text": "Once upon", "finish_reason": None}
        if signal.getsignal(self.signum) in (signal.SIG_DFL, signal.default_int_handler):
            pytest.fail("nothing stops the answer for the signal: it would end the program, or the test run")
        os.kill(os.getpid(), self.signum)
        for _ in range(6000):  # the handler runs in this thread, at the latest as the sleep returns
            if cancel is not None and cancel.is_set():
                break
            time.sleep(0.01)
        else:
            pytest.fail("the signal did not stop the answer")
        self.turns.append(SimpleNamespace(answer_text="Once upon a [cancelled]"))
        yield {"text": " a", "finish_reason": "cancelled", "token_ids": [1, 2, 3], "timing": {},
               "usage": {"completion_tokens": 3}}  # fmt: skip

    def describe(self):
        from types import SimpleNamespace

        return SimpleNamespace(load_s=0.0, memory_device=None, more_room="")


@pytest.fixture
def signals_as_a_shell_starts_them():
    """Ctrl-C, SIGTERM and SIGHUP handled as in a command started from a shell: pytest run under
    `nohup` (or as a background job) inherits SIGHUP (SIGINT) ignored, which the CLI keeps ignored."""
    import signal

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    saved = {signum: signal.signal(signum, handler) for signum, handler in defaults.items()}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
@pytest.mark.usefixtures("signals_as_a_shell_starts_them")
def test_a_signal_mid_answer_keeps_the_partial_answer_and_says_so(monkeypatch, capsys, as_json, signame, code):
    # --json: stdout stayed empty (status 130, or killed by SIGTERM under `timeout`), the text so far lost;
    # text: SIGTERM or SIGHUP killed the process mid-line (no line end, nothing on stderr); Ctrl-C kept it
    import argparse
    import signal

    from internvl_chat.settings import load_settings
    from internvl_chat.ui import oneshot

    signum = getattr(signal, signame)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(oneshot, "open_conversation", lambda settings: _SignalledAnswer(signum))
    monkeypatch.setattr(oneshot, "media_from_flags", lambda session, args, settings: [])
    args = argparse.Namespace(json=as_json, prompt_flag="Tell me a story.", prompt=[])
    settings = load_settings(os.devnull, env={}, overrides={"media.auto_attach": False})
    assert oneshot.run_oneshot(args, settings, "Tell me a story.") == code
    out, err = capsys.readouterr()
    if as_json:
        answer = json.loads(out)
        assert answer["text"] == "Once upon a" and answer["finish_reason"] == "cancelled"
    else:
        assert out == "Once upon a\n"  # the text so far, its line ended; no stats line for an answer cut short
    assert err == ("internvl-chat: interrupted\n" if signame == "SIGINT" else f"internvl-chat: stopped by {signame}\n")
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back


def test_a_signal_ignored_at_the_start_stays_ignored_while_the_answer_runs():
    # `nohup internvl-chat -p …`: a closed terminal's SIGHUP must not stop the answer
    import signal
    import threading

    from internvl_chat.ui import oneshot

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        replaced = oneshot._stop_on_signals(threading.Event(), [])
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.SIGHUP not in replaced
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_stdout_that_cannot_hold_the_answer_gets_escapes_not_a_traceback(tiny_original):
    from internvl_chat.files import GLYPHS_OR_ESCAPES

    # PYTHONIOENCODING=ascii (or a Latin-1 locale): the first character it could not encode raised
    # UnicodeEncodeError, a traceback and status 1, in one-shot, --json and --script alike
    flags = ("--model", str(tiny_original), "--device", "cpu", "--max-new-tokens", "30", "--no-stats")
    whole = json.loads(cli(*flags, "--json", "-p", "hi").stdout)["text"]
    assert not whole.isascii()  # the tiny model's answer holds characters ASCII has not
    ascii_env = {"PYTHONIOENCODING": "ascii"}
    as_json = cli(*flags, "--json", "-p", "hi", env=ascii_env)
    assert as_json.returncode == 0 and as_json.stdout.isascii(), as_json.stderr
    assert json.loads(as_json.stdout)["text"] == whole  # \u escapes: the same JSON
    text = cli(*flags, "-p", "hi", env=ascii_env)
    assert text.returncode == 0 and "Traceback" not in text.stderr, text.stderr
    # escapes, or the ASCII glyph of one the app prints itself ("…" as "...")
    assert text.stdout == whole.encode("ascii", GLYPHS_OR_ESCAPES).decode() + "\n"
    script = cli(*flags, "--script", "-", stdin="hi\n", env=ascii_env)
    assert script.returncode == 0 and "Traceback" not in script.stderr, script.stderr


def test_media_named_as_stdin_is_not_read_as_the_prompt(tiny_original, image):
    # stdin was read as prompt text first and its picture refused with "pass it with --image FILE",
    # which the command line did
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    base = [sys.executable, "-m", "internvl_chat.cli", "--model", str(tiny_original), "--device", "cpu",
            "--max-new-tokens", "2", "--no-stats", "-p", "hi"]  # fmt: skip
    with open(image, "rb") as stdin:  # `--image /dev/stdin < photo.png`: the picture is that file
        run = subprocess.run([*base, "--image", "/dev/stdin"], stdin=stdin, capture_output=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    for flag in ("--image", "--video"):
        run = subprocess.run([*base, flag, "-"], input=image.read_bytes(), capture_output=True, env=env, timeout=300)
        assert run.returncode == 2 and run.stderr.decode().strip() == (
            f"internvl-chat: error: {flag} - : pictures and videos are read from files, not from stdin; "
            f"save it to a file and pass {flag} FILE")  # fmt: skip


def test_piped_text_with_windows_line_ends_reaches_the_model_with_newlines(monkeypatch, tmp_path):
    # a file saved on Windows reached the model with "\r\n" (a script's lines drop the \r); a lone \r
    # is kept (a progress bar's redraw in captured output, not a line end)
    from internvl_chat import cli as cli_module

    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line one\r\nline two\r\n50%\r100%\r\n")
    with open(notes, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        args = cli_module.build_parser().parse_args(["-p", "Summarise."])
        assert cli_module._read_prompt(args) == "line one\nline two\n50%\r100%\n\nSummarise."



@pytest.mark.parametrize("args, word", [
    (["-p", "/save chat.json"], "/save"),
    (["/image", "cat.png", "what", "is", "it?"], "/image"),
    (["-p", "  /HELP"], "/HELP"),
    (["-I", "-p", "/set temperature 0.5"], "/set"),
    (["-p", "\ufeff/save chat.json"], "/save"),  # copied with a byte-order mark: the REPL runs it as /save
])  # fmt: skip
def test_a_repl_command_as_the_prompt_is_refused_before_the_model_loads(args, word, tmp_path):
    # it was sent to the model as text: an answer, status 0, and nothing saved or set
    run = cli("--model", str(tmp_path / "no-model"), *args)
    _one_line(run, 2, f"{word} is a REPL command, but a prompt given with -p (or after the flags) is sent to the model as text;")
    assert "--script -" in run.stderr and not list(tmp_path.iterdir())
    assert ("attach with --image PATH" in run.stderr) == (word == "/image")


def test_a_prompt_that_starts_with_a_path_or_a_double_slash_is_still_sent():
    for prompt in ("/media/usb/cat.png what is it?", "//help is a comment"):
        run = cli("--max-new-tokens", "3", "-p", prompt)
        assert run.returncode == 0 and run.stdout.strip(), run.stderr


def test_no_prompt_with_only_stdout_redirected_names_the_repl_flag(monkeypatch):
    # `internvl-chat > chat.log` typed at a terminal was told to pipe text on stdin; -I is what opens the REPL there
    from internvl_chat import cli as cli_module
    from internvl_chat.errors import UsageError

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a file, even under `pytest -s` at a terminal
    monkeypatch.setenv("INTERNVL_CHAT_CONFIG", os.devnull)
    with pytest.raises(UsageError, match=r"no REPL opens; pass -p TEXT \(or words after the flags\), or -I for the REPL"):
        cli_module.run([])


def test_repl_lines_piped_to_the_repl_are_pointed_to_the_script_flag_that_reads_stdin():
    # the REPL lines piped here were told to go in a --script FILE: `--script -` runs them as they are
    run = cli("-I", stdin="/image cat.png\nHow many?\n")
    _one_line(run, 2, "the REPL needs a terminal on stdin; use --script FILE for scripted input (--script - reads it from stdin)")


class _AnswerStoppedInItsWrite:
    """A conversation without a model: "Once upon", then " a" (cancelled if a signal came meanwhile)."""

    def __init__(self):
        self.turns: list = []

    def ask(self, prompt, media, params=None, cancel=None):
        from types import SimpleNamespace

        yield {"text": "Once upon", "finish_reason": None}
        reason = "cancelled" if cancel is not None and cancel.is_set() else "stop"
        self.turns.append(SimpleNamespace(answer_text="Once upon a"))
        yield {"text": " a", "finish_reason": reason, "token_ids": [1, 2, 3], "timing": {}, "usage": {"completion_tokens": 3}}

    def describe(self):
        from types import SimpleNamespace

        return SimpleNamespace(load_s=0.0, memory_device=None, more_room="")


class _SignalInTheWrite:
    """stdout on a pipe with room to spare, whose first write is where the signal lands (Ctrl-C
    pressed just then): the write itself does not wait on anyone."""

    def __init__(self, fd: int, signum: int):
        self.stream = open(fd, "w", encoding="utf-8", closefd=False)
        self.signum, self.sent = signum, False

    def write(self, text: str) -> int:
        if not self.sent:
            import signal

            self.sent = True
            signal.raise_signal(self.signum)  # its handler runs here, before the bytes go
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@pytest.mark.usefixtures("signals_as_a_shell_starts_them")
def test_a_signal_that_lands_in_a_write_that_does_not_wait_still_keeps_the_answer(monkeypatch, capsys, as_json):
    """A stop signal that landed while stdout was written ended the run at once, even where the write
    did not wait on its reader: Ctrl-C pressed as a token was printed left the answer's line open
    (the stderr line continued it), and one as the --json object was printed lost the object. Only
    a write that waits (the reader's pipe full) is given up on; this one finishes and the answer
    stops at the next token as usual."""
    import argparse
    import signal

    from internvl_chat.settings import load_settings
    from internvl_chat.ui import oneshot

    read_end, write_end = os.pipe()
    silenced = []
    monkeypatch.setattr(oneshot, "silence_stdout", lambda: silenced.append(1))  # never this process's fd 1
    monkeypatch.setattr(oneshot, "open_conversation", lambda settings: _AnswerStoppedInItsWrite())
    monkeypatch.setattr(oneshot, "media_from_flags", lambda session, args, settings: [])
    stdout = _SignalInTheWrite(write_end, signal.SIGINT)
    monkeypatch.setattr(sys, "stdout", stdout)
    args = argparse.Namespace(json=as_json, prompt_flag="Tell me a story.", prompt=[])
    settings = load_settings(os.devnull, env={}, overrides={"media.auto_attach": False})
    try:
        code = oneshot.run_oneshot(args, settings, "Tell me a story.")
        stdout.stream.close()
        os.close(write_end)
        write_end = None
        with open(read_end, "rb", closefd=False) as pipe:
            out = pipe.read().decode()
    finally:
        if write_end is not None:
            os.close(write_end)
        os.close(read_end)
    assert stdout.sent and silenced == []
    assert code == 130 and capsys.readouterr().err == "internvl-chat: interrupted\n"
    if as_json:
        assert json.loads(out)["text"] == "Once upon a"  # the object, whole
    else:
        assert out == "Once upon a\n"  # the text so far, its line ended


@pytest.mark.usefixtures("signals_as_a_shell_starts_them")
def test_a_signal_while_stdout_is_full_ends_the_run_at_once(monkeypatch):
    # the other side of the test above: a write that would wait on its reader is given up on
    import signal
    import threading

    from internvl_chat.ui import oneshot

    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(write_end, b"x" * 4096)  # the reader reads nothing: the pipe is full
        stdout = _SignalInTheWrite(write_end, signal.SIGTERM)
        monkeypatch.setattr(sys, "stdout", stdout)
        cancel, stopped_by, writing = threading.Event(), [], threading.Event()
        replaced = oneshot._stop_on_signals(cancel, stopped_by, writing)
        try:
            writing.set()
            with pytest.raises(oneshot._StoppedWhileWriting) as stopped:
                signal.raise_signal(signal.SIGTERM)
        finally:
            for signum, handler in replaced.items():
                signal.signal(signum, handler)
        assert stopped.value.signum == signal.SIGTERM and cancel.is_set()
        stdout.stream.close()  # nothing was written: no buffer to flush
    finally:
        os.close(write_end)
        os.close(read_end)


class _StoppedAsTheReaderStalls:
    """A conversation without a model: "Once upon", then its reader stops reading (the pipe fills)
    and `timeout`'s SIGTERM comes while the next token is made, not in a write."""

    def __init__(self, fd: int):
        self.fd = fd
        self.turns: list = []

    def ask(self, prompt, media, params=None, cancel=None):
        import signal
        from types import SimpleNamespace

        yield {"text": "Once upon", "finish_reason": None}
        with pytest.raises(BlockingIOError):
            while True:
                os.write(self.fd, b"x" * 4096)
        signal.raise_signal(signal.SIGTERM)
        for _ in range(6000):  # the handler runs in this thread, at the latest as the wait returns
            if cancel.wait(0.01):
                break
        else:
            pytest.fail("the signal did not ask the answer to stop")
        self.turns.append(SimpleNamespace(answer_text="Once upon a"))
        yield {"text": " a", "finish_reason": "cancelled", "token_ids": [1, 2, 3], "timing": {}, "usage": {"completion_tokens": 3}}

    def describe(self):
        from types import SimpleNamespace

        return SimpleNamespace(load_s=0.0, memory_device=None, more_room="")


class _UnbufferedOut:
    """stdout straight onto a file descriptor: nothing left in a buffer to flush after the test."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, text: str) -> int:
        return os.write(self.fd, text.encode())

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@pytest.mark.usefixtures("signals_as_a_shell_starts_them")
def test_a_signal_between_tokens_with_the_reader_stalled_still_ends_the_run(monkeypatch, capsys, as_json):
    """A stop signal that came between tokens asked for a stop at the next one; the answer's last
    writes (its last piece and line end, or the whole --json object) then waited on a reader that
    had stopped reading, for good: the one signal `timeout` sends was spent. Once a stop is asked
    for, a write that would wait ends the run at once, as a signal landing in it does. (The pipe
    here does not block, so the old code fails with BlockingIOError instead of hanging.)"""
    import argparse

    from internvl_chat.settings import load_settings
    from internvl_chat.ui import oneshot

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    silenced = []
    monkeypatch.setattr(oneshot, "silence_stdout", lambda: silenced.append(1))  # never this process's fd 1
    monkeypatch.setattr(oneshot, "open_conversation", lambda settings: _StoppedAsTheReaderStalls(write_end))
    monkeypatch.setattr(oneshot, "media_from_flags", lambda session, args, settings: [])
    monkeypatch.setattr(sys, "stdout", _UnbufferedOut(write_end))
    args = argparse.Namespace(json=as_json, prompt_flag="Tell me a story.", prompt=[])
    settings = load_settings(os.devnull, env={}, overrides={"media.auto_attach": False})
    try:
        code = oneshot.run_oneshot(args, settings, "Tell me a story.")
    finally:
        os.close(write_end)
        os.close(read_end)
    assert code == 143 and silenced == [1]
    assert capsys.readouterr().err == "internvl-chat: stopped by SIGTERM\n"


def test_a_utf8_prompt_under_the_c_locale_is_read_as_utf8():
    # LC_ALL=C without UTF-8 mode: Python decodes argv as ASCII, each byte of "é" a surrogate;
    # it was refused as "not UTF-8 text (byte 0xc3)", though its bytes are UTF-8
    from internvl_chat import cli as cli_module

    args = cli_module.build_parser().parse_args(["-p", "h\udcc3\udca9llo", "w\udcc3\udcb6rld"])
    cli_module._argv_as_utf8(args)
    assert (args.prompt_flag, args.prompt) == ("héllo", ["wörld"])
    args = cli_module.build_parser().parse_args(["-p", "caf\udce9"])  # bytes that are not UTF-8 stay as they were
    cli_module._argv_as_utf8(args)
    assert args.prompt_flag == "caf\udce9"


def test_a_utf8_prompt_under_the_c_locale_reaches_the_model():
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull,
           "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # fmt: skip
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run([sys.executable, "-m", "internvl_chat.cli", "--max-new-tokens", "3", "--json", "-p", "héllo"],
                         capture_output=True, timeout=300, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["usage"]["prompt_tokens"] > 0


class _AnswerStoppedBySignal(_SignalledAnswer):
    """An answer that a SIGTERM stops between tokens (the first signal: cancelled, the text kept)."""

    def __init__(self):
        super().__init__(__import__("signal").SIGTERM)


@pytest.mark.parametrize("held", [True, False], ids=["held", "taken-by-another-thread"])
@pytest.mark.usefixtures("signals_as_a_shell_starts_them")
def test_a_second_signal_while_the_handlers_are_put_back_leaves_none_of_them_behind(monkeypatch, capsys, held):
    # the answer stopped by SIGTERM, a second one came while one-shot put main's handlers back: its
    # handler raised from the loop, which left its own for SIGTERM and SIGHUP in place; a later
    # signal (Ctrl-C as the program ended) then raised _StoppedWhileWriting outside every handler: a traceback
    import argparse
    import signal

    from internvl_chat.errors import EndedBySignal
    from internvl_chat.settings import load_settings
    from internvl_chat.ui import oneshot

    def end(signum, frame):  # main's handler (cli._end_on_stop_signals)
        raise EndedBySignal(signum)

    signal.signal(signal.SIGTERM, end)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    real_signal = signal.signal
    sent = []

    def put_back(signum, handler):
        previous = real_signal(signum, handler)
        if handler is before.get(signum) and not sent:  # the first handler put back: a second SIGTERM comes now
            sent.append(signum)
            # to this thread: sent to the process while this thread holds it, it went to another thread
            # (pytest-xdist's), whose C handler could trip the flag only after the run had returned
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        return previous

    monkeypatch.setattr(oneshot, "open_conversation", lambda settings: _AnswerStoppedBySignal())
    monkeypatch.setattr(oneshot, "media_from_flags", lambda session, args, settings: [])
    args = argparse.Namespace(json=False, prompt_flag="Tell me a story.", prompt=[])
    settings = load_settings(os.devnull, env={}, overrides={"media.auto_attach": False})
    monkeypatch.setattr(signal, "signal", put_back)
    if not held:  # as where another thread takes the signal: its Python handler still runs in the loop
        monkeypatch.delattr(signal, "pthread_sigmask")
    try:
        try:
            code = oneshot.run_oneshot(args, settings, "Tell me a story.")
        except EndedBySignal as e:  # the second one, ended by main's handler (cli.main says it, 143)
            code = 128 + e.signum
    finally:
        monkeypatch.undo()
    assert sent and code == 143
    assert {s: signal.getsignal(s) for s in before} == before  # every handler is put back
    assert "Once upon a" in capsys.readouterr().out


@pytest.mark.parametrize("argv, sent", [
    (["-p", "//etc/hosts is what?"], "/etc/hosts is what?"),
    (["//help", "me"], "/help me"),
    (["-p", "  //save this"], "  /save this"),
    (["-p", "\ufeff//x"], "\ufeff/x"),
    (["-p", "a // b"], "a // b"),  # only a leading one
    (["-p", "/media/usb/x.png"], "/media/usb/x.png"),  # a path: no escape to take off
    (["-p", "", "//save", "this"], "/save this"),  # an empty -p: the words are the prompt, as the refusal reads them
])  # fmt: skip
def test_a_double_slash_at_the_start_of_the_prompt_sends_one_as_the_repl_does(monkeypatch, tmp_path, argv, sent):
    # the REPL sends `//TEXT` as `/TEXT`; one-shot sent both slashes, and its refusal of `-p "/save …"`
    # offered no way to send a text that starts with a command word
    assert _prompt_sent(monkeypatch, tmp_path, argv, b"") == sent


def _prompt_sent(monkeypatch, tmp_path, argv: list[str], stdin: bytes) -> str:
    """The prompt one-shot would answer for `argv`, with `stdin` piped in (the model never runs)."""
    from internvl_chat import cli as cli_module
    from internvl_chat.ui import oneshot

    got = []
    monkeypatch.setattr(oneshot, "run_oneshot", lambda args, settings, prompt: got.append(prompt) or 0)
    monkeypatch.setenv("INTERNVL_CHAT_CONFIG", os.devnull)
    piped = tmp_path / "piped"
    piped.write_bytes(stdin)
    with open(piped, encoding="utf-8") as file:
        monkeypatch.setattr(sys, "stdin", file)
        assert cli_module.run(argv) == 0
    assert len(got) == 1
    return got[0]


def test_the_refusal_of_a_command_word_as_the_prompt_names_the_double_slash(tmp_path):
    run = cli("--model", str(tmp_path / "no-model"), "-p", "/save chat.json")
    assert "begin it with // (sent as one /)" in run.stderr


@pytest.mark.parametrize("argv", [["-p", "-"], ["-"]])
def test_a_dash_as_the_prompt_reads_it_from_stdin(monkeypatch, tmp_path, argv):
    # `-p -` (as --script - reads stdin) sent the piped text with "\n\n-" after it, and
    # with nothing piped the question "-"
    from internvl_chat import cli as cli_module
    from internvl_chat.errors import UsageError

    assert _prompt_sent(monkeypatch, tmp_path, argv, b"What is a triangle?\n") == "What is a triangle?"
    piped = tmp_path / "piped"
    piped.write_bytes(b"")
    with open(piped, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        with pytest.raises(UsageError, match="stdin is empty"):
            cli_module.run(argv)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    with pytest.raises(UsageError, match=r"reads the prompt from stdin, but stdin is a terminal"):
        cli_module.run(argv)


def test_a_prompt_read_from_stdin_is_sent_as_it_is(monkeypatch, tmp_path):
    # README and -p's help: piped text is never a command; the refusals and the // escape are for typed prompts
    text = "//save is a verb\n/video clip.mp4 --frames 4"
    assert _prompt_sent(monkeypatch, tmp_path, ["-p", "-"], text.encode()) == text
    assert _prompt_sent(monkeypatch, tmp_path, ["-p", "-"], b"/save chat.json") == "/save chat.json"


def test_a_video_line_with_options_in_the_prompt_is_refused_with_the_flags_to_use(tmp_path):
    # the REPL runs a pasted `/video PATH --frames 4` line as the command; in -p the path went with
    # the default frames and the model read "/video --frames 4"
    run = cli("--model", str(tmp_path / "no-model"), "-p", "Describe this\n/video clip.mp4 --frames 4")
    _one_line(run, 2, "the prompt's line '/video clip.mp4 --frames 4' is a REPL command with options")
    assert "attach with --video PATH and its flags (--frames N, --video-range A-B)" in run.stderr  # the flag there is (--range is not)


def test_a_command_line_in_the_prompt_is_quoted_escaped_once(tmp_path):
    """The line was escaped, then quoted with repr(), which doubled every backslash of its escapes."""
    run = cli("--model", str(tmp_path / "no-model"), "-p", "Describe this\n/video c\x1b[31mlip\u202e.mp4 --frames 4")
    _one_line(run, 2, "the prompt's line '/video c\\e[31mlip\\u202e.mp4 --frames 4' is a REPL command with options")
    assert "\x1b" not in run.stderr and "\u202e" not in run.stderr and "\\\\" not in run.stderr, run.stderr


def test_a_signal_handled_as_the_mask_is_set_leaves_no_signal_blocked(monkeypatch):
    # pthread_sigmask runs the Python handlers of signals already caught (PyErr_CheckSignals) right
    # after it blocks them: a stop handler's raise came out of the SIG_BLOCK call itself, before the
    # mask was to be put back, and SIGINT, SIGTERM and SIGHUP stayed blocked for the rest of the run
    # (Ctrl-C did nothing; an editor or video decoder started later inherited the blocked mask)
    import signal

    from internvl_chat.errors import EndedBySignal, put_back_signal_handlers

    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    before = {s: signal.getsignal(s) for s in signums}

    def stop(signum, frame):
        raise EndedBySignal(signum)

    replaced = {s: signal.signal(s, stop) for s in signums}
    real_sigmask = signal.pthread_sigmask
    raised = []

    def sigmask(how, mask):
        previous = real_sigmask(how, mask)
        if how == signal.SIG_BLOCK and mask and not raised:  # a SIGTERM caught just before: its handler runs now
            raised.append(True)
            raise EndedBySignal(signal.SIGTERM)
        return previous

    monkeypatch.setattr(signal, "pthread_sigmask", sigmask)
    try:
        with pytest.raises(EndedBySignal):
            put_back_signal_handlers(replaced)
    finally:
        monkeypatch.undo()
        left_blocked = real_sigmask(signal.SIG_SETMASK, before_mask)
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert raised
    assert left_blocked == before_mask  # nothing left blocked
    assert {s: signal.getsignal(s) for s in signums} == before


def test_a_video_line_with_options_in_a_code_block_of_the_prompt_is_sent_as_text(monkeypatch, tmp_path):
    # the REPL runs no line of a fenced code block; -p refused such a prompt as a command it would run
    prompt = "What does this do?\n```\n/video PATH --frames N\n```"
    assert _prompt_sent(monkeypatch, tmp_path, ["-p", prompt], b"") == prompt


def test_a_video_line_with_options_in_an_indented_code_block_of_the_prompt_is_sent_as_text(monkeypatch, tmp_path):
    # the REPL runs no line of an indented (4 spaces or a tab) code block either
    from types import SimpleNamespace

    from internvl_chat import cli as cli_module
    from internvl_chat.errors import UsageError

    prompt = "What does this do?\n\n    /video PATH --frames N\n\t/image PATH --frames 2"
    assert _prompt_sent(monkeypatch, tmp_path, ["-p", prompt], b"") == prompt
    with pytest.raises(UsageError, match="is a REPL command with options"):  # less indented: run by the REPL
        cli_module._refuse_repl_command(SimpleNamespace(prompt_flag="Compare\n   /video PATH --frames 2", prompt=None))


def test_a_prompt_s_lines_are_those_the_repl_runs_an_escaped_line_break_kept_inside_its_line(monkeypatch, tmp_path):
    """The REPL keeps a line break escaped by a backslash inside its line (a file name holding one,
    as Tab completion writes it), -p split at every break: a `/video` line the REPL runs was sent as
    text, and a text line it sends whole was refused as a command."""
    from types import SimpleNamespace

    from internvl_chat import cli as cli_module
    from internvl_chat.errors import UsageError

    with pytest.raises(UsageError, match=r"(?s)the prompt's line '/video my.+clip\.mp4 --frames 4' is a REPL command"):
        cli_module._refuse_repl_command(SimpleNamespace(prompt_flag="Describe this\n/video my\\\nclip.mp4 --frames 4", prompt=None))
    prompt = "A path ends with a backslash: C:\\\n/video clip.mp4 --frames 4"  # one line in the REPL: its text
    assert _prompt_sent(monkeypatch, tmp_path, ["-p", prompt], b"") == prompt


def test_a_utf8_system_message_under_the_c_locale_is_read_as_utf8():
    # the prompt typed at an LC_ALL=C terminal was read as UTF-8, but `--system "Réponds…"` typed
    # beside it was still refused as "not UTF-8 text (byte 0xc3)"
    from internvl_chat import cli as cli_module

    args = cli_module.build_parser().parse_args(["--system", "R\udcc3\udca9ponds", "-p", "salut"])
    cli_module._argv_as_utf8(args)
    assert args.system == "Réponds"
    args = cli_module.build_parser().parse_args(["--system", "caf\udce9"])  # bytes that are not UTF-8 stay as they were
    cli_module._argv_as_utf8(args)
    assert args.system == "caf\udce9"


def _waits_on_a_pipe_or_ended(child: subprocess.Popen) -> None:
    """Return once `child` sleeps in a pipe read or write (the kernel's wait channel says so), or has ended."""
    wchan = Path(f"/proc/{child.pid}/wchan")
    deadline = time.monotonic() + 300  # a child stuck elsewhere fails the test, not hangs the suite
    while child.poll() is None:
        assert time.monotonic() < deadline, "the child never waited on a pipe"
        try:
            if "pipe" in wchan.read_text():
                return
        except OSError:
            pass
        time.sleep(0.001)  # not a busy loop: on a 2-core machine it took a core from the child it waits for


def _wait_channels_name_pipes() -> bool:
    """Whether this kernel names a pipe read in a task's wait channel ("pipe_read", "anon_pipe_read",
    "pipe_wait"): one that hides them ("0" for every task) would leave the child waited for forever."""
    read_end, write_end = os.pipe()
    reader = threading.Thread(target=os.read, args=(read_end, 1), daemon=True)
    reader.start()
    try:
        wchan = Path(f"/proc/self/task/{reader.native_id}/wchan")
        deadline = time.monotonic() + 30  # the reader is in its read at once, but a busy machine may not run it at once
        while time.monotonic() < deadline:
            with suppress(OSError):
                if "pipe" in wchan.read_text():
                    return True
            time.sleep(0.01)
        return False
    finally:
        os.write(write_end, b"x")
        reader.join()
        os.close(read_end)
        os.close(write_end)


def _needs_pipe_wait_channels() -> None:
    if not Path("/proc/self/wchan").exists() or not _wait_channels_name_pipes():
        pytest.skip("needs /proc's wait channels naming pipe waits")


def _with_nonblocking(fd: int) -> int:
    os.set_blocking(fd, False)
    return fd


def test_a_nonblocking_stdin_pipe_whose_writer_is_slow_is_waited_for(tmp_path):
    # a stdin left non-blocking by whatever started us (a shared pipe): reading it before the writer
    # wrote failed with "cannot read stdin (Resource temporarily unavailable)", status 2
    _needs_pipe_wait_channels()
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:  # the child's own copies stay open
        child = subprocess.Popen([sys.executable, "-m", "internvl_chat.cli", "-p", "-"], stdin=_with_nonblocking(read_end),
                                 stdout=out, stderr=err, env=env)  # fmt: skip
    os.close(read_end)
    _waits_on_a_pipe_or_ended(child)  # unfixed, it has ended by now
    with suppress(BrokenPipeError):
        os.write(write_end, b"How many shapes are there?\n")
    os.close(write_end)
    assert child.wait(timeout=300) == 0, (tmp_path / "err").read_text()
    assert (tmp_path / "out").read_text().strip()


def test_a_nonblocking_stdout_pipe_that_fills_loses_no_output(tmp_path):
    # stdout left non-blocking: once the pipe was full, Python's writer dropped the rest (EAGAIN),
    # and the run ended with status 0: a transcript of 60 /help lines came back with about 30
    _needs_pipe_wait_channels()
    script = tmp_path / "help.txt"
    script.write_text("/help\n" * 60)
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    with (tmp_path / "err").open("w") as err:  # the child's own copy stays open
        child = subprocess.Popen([sys.executable, "-m", "internvl_chat.cli", "--script", str(script)],
                                 stdin=subprocess.DEVNULL, stdout=_with_nonblocking(write_end), stderr=err, env=env)  # fmt: skip
    os.close(write_end)
    _waits_on_a_pipe_or_ended(child)  # the pipe full: unfixed, it went on without it and ended
    with os.fdopen(read_end, "rb") as pipe:
        transcript = pipe.read().decode()
    assert child.wait(timeout=300) == 0, (tmp_path / "err").read_text()
    assert transcript.count(">>> /help") == 60


@pytest.mark.parametrize("how", ["help", "usage error", "SIGTERM"])
def test_std_fds_left_non_blocking_are_non_blocking_again_at_exit(how):
    """The app makes fds 0-2 blocking for its run (the two tests above), but left them so: the flag
    belongs to the pipe or terminal, shared with whatever started it, which then blocked where it
    never had. At exit, on every path, they are non-blocking again."""
    import signal

    if how == "SIGTERM":
        _needs_pipe_wait_channels()
    stdin_read, stdin_write = os.pipe()
    out_read, out_write = os.pipe()
    for fd in (stdin_read, out_write):
        os.set_blocking(fd, False)
    output = bytearray()
    def read_all():  # each read is one bytes chunk (bytearray.extend of the chunks raised TypeError)
        for chunk in iter(lambda: os.read(out_read, 65536), b""):
            output.extend(chunk)

    drain = threading.Thread(target=read_all, daemon=True)
    drain.start()  # a --help longer than the pipe holds must not stall the child
    argv = {"help": ["--help"], "usage error": ["--no-such-flag"], "SIGTERM": ["-p", "-"]}[how]
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-m", "internvl_chat.cli", *argv], stdin=stdin_read, stdout=out_write,
                                 stderr=out_write, env=env)  # fmt: skip
        if how == "SIGTERM":
            _waits_on_a_pipe_or_ended(child)  # reading the empty stdin
            child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=300)
        blocking = os.get_blocking(stdin_read), os.get_blocking(out_write)
    finally:
        if child is not None and child.poll() is None:  # a failed wait: no child left behind, holding the pipe
            child.kill()
            child.wait()
        for fd in (stdin_read, stdin_write, out_write):
            os.close(fd)
        drain.join(timeout=60)
        os.close(out_read)
    assert code == {"help": 0, "usage error": 2, "SIGTERM": 143}[how], output.decode()
    assert blocking == (False, False), output.decode()
