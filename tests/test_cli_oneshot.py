"""One-shot CLI: --json greedy ids equal transformers' generate; exit codes; stdout holds only the answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert set(out) == {"text", "token_ids", "finish_reason", "usage", "timing"}
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
        (["-p", "hi", "--temperature", "-1"], "temperature"),
        (["-p", "hi", "--device", "tpu"], "device"),
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


def test_corrupt_checkpoint_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    run = cli("--model", str(tmp_path), "-p", "hi")
    assert run.returncode == 2
    assert "unknown architecture" in run.stderr


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
