"""The shipped demo model (internvl_chat/demo_model) answers fixed scenes correctly, through the CLI.

A regression test for the committed weights: the scenes below come from the evaluation seed range of
internvl_chat/demo/scenes.py (never trained on), and the cases were chosen among those the shipped
model (trained for 3 minutes on an H100, see its training.json) answers right; its measured
accuracy is in benchmarks/RESULTS.md, and it is far from perfect (shape questions especially). The
expected answers are the scene generator's canonical answers, not the model's output, so the test
fails when new weights, the engine, tiling, the prompt or the tokenizer change what the model sees
or says. When you ship retrained weights, choose the cases again among the ones the new model gets
right (and say so in the commit).

Every fixed scene is a single 448-pixel tile, so the whole file runs in seconds: one `--script` run
asks all the questions (one conversation per scene, as a user would) plus the questions of the
scripted demo (examples/demo.txt) about its picture, and one one-shot run asks one more.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.demo.scenes import EVAL_SEED_BASE, answers_match, make_scene
from internvl_chat.media.image import count_tiles

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "internvl_chat" / "demo_model"
DEMO_SCRIPT = REPO / "examples" / "demo.txt"

# (scene seed, question, canonical answer), asked per scene in this order as one conversation
CASES: list[tuple[int, str, str]] = [
    (3, "How many shapes are there?", "Three."),  # orange circle, green triangle, yellow star
    (3, "What colour is the star?", "Yellow."),
    (3, "What shape is yellow?", "A star."),
    (3, "Is the orange circle on the left or the right?", "Right."),
    (51, "How many shapes are there?", "Two."),
    (51, "What color is the circle?", "Blue."),
    (51, "What shape is the blue one?", "A circle."),
    (51, "Is the blue circle at the top or the bottom?", "Bottom."),
    (14, "How many shapes are there?", "One."),
    (14, "What color is the shape?", "Blue."),
    (14, "What shape is blue?", "A triangle."),
    (14, "Is the blue triangle at the top or the bottom?", "Top."),
]

# one more question, asked in a fresh one-shot run (its scene is drawn like the others)
ONE_SHOT: tuple[int, str, str] = (13, "What shape is in the image?", "A circle.")  # a green circle


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTERNVL_CHAT_CONFIG": os.devnull}
    return subprocess.run([sys.executable, "-m", "internvl_chat.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def question_type(seed: int, question: str, answer: str) -> str:
    """The type scenes.py gives this question on this scene; fails if the scene no longer asks it
    with this answer (the generator changed, so the fixed cases mean something else now)."""
    for qtype, qas in make_scene(seed).questions().items():
        for qa in qas:
            if qa.question == question:
                assert qa.answer == answer, f"scene {seed}: {question!r} is now answered {qa.answer!r}"
                return qtype
    raise AssertionError(f"scene {seed} no longer asks {question!r}")


def demo_picture_seed() -> int:
    """The scenes.py seed that scripts/make_demo_media.py draws as the demo's scene.png."""
    spec = importlib.util.spec_from_file_location("make_demo_media", REPO / "scripts" / "make_demo_media.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.draw_scene().tobytes() == make_scene(module.DEMO_SCENE_SEED).render().tobytes()
    return module.DEMO_SCENE_SEED


def demo_questions() -> list[tuple[str, str]]:
    """(question, canonical answer) for every question examples/demo.txt asks about its picture."""
    seed = demo_picture_seed()
    canonical = {qa.question: qa.answer for qas in make_scene(seed).questions().values() for qa in qas}
    lines = [line.strip() for line in DEMO_SCRIPT.read_text(encoding="utf-8").splitlines()]
    questions = [line for line in lines if line and not line.startswith(("#", "/"))]
    missing = [q for q in questions if q not in canonical]
    assert not missing, f"examples/demo.txt asks what scene {seed} has no canonical answer for: {missing}"
    return [(q, canonical[q]) for q in questions]


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("demo_scenes")
    files = {}
    for seed in sorted({seed for seed, _, _ in CASES} | {ONE_SHOT[0], demo_picture_seed()}):
        files[seed] = folder / f"scene_{seed}.png"
        make_scene(seed).render().save(files[seed])  # PNG: the pixels scenes.py drew, exactly
    return files


def test_cases_are_held_out_single_tile_scenes_of_each_kind():
    types = [question_type(*case) for case in CASES + [ONE_SHOT]]
    for qtype in ("colour", "shape", "count"):
        assert types.count(qtype) >= 2, f"only {types.count(qtype)} {qtype} question(s)"
    for seed, _, _ in CASES + [ONE_SHOT]:
        assert EVAL_SEED_BASE <= seed < EVAL_SEED_BASE + 10_000  # the evaluation range, not training's
        scene = make_scene(seed)
        assert count_tiles(scene.width, scene.height, 12) == 1


def transcript_answers(stdout: str) -> dict[str, list[str]]:
    """Question → the answers printed after its echo (`>>> question`, then the answer's lines)."""
    answers: dict[str, list[str]] = {}
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(">>> ") and not line.startswith(">>> /"):
            answer = []
            for following in lines[i + 1 :]:
                if not following.strip() or following.startswith(">>> "):
                    break
                answer.append(following)
            answers.setdefault(line[4:], []).append(" ".join(answer))
    return answers


def test_demo_script_asks_colour_count_and_position_or_shape():
    types = [question_type(demo_picture_seed(), q, a) for q, a in demo_questions()]
    assert {"colour", "count"} <= set(types) and {"position", "shape"} & set(types)


def test_script_run_answers_the_fixed_scenes_and_the_demo(scene_files, tmp_path):
    conversations = [(seed, [(q, a) for s, q, a in CASES if s == seed]) for seed in dict.fromkeys(s for s, _, _ in CASES)]
    conversations.append((demo_picture_seed(), demo_questions()))  # as `make demo` asks them
    script_lines = []
    expected: dict[str, list[str]] = {}
    for seed, turns in conversations:
        script_lines += ["/clear", f"/image {scene_files[seed]}"]
        for question, answer in turns:
            script_lines.append(question)
            expected.setdefault(question, []).append(answer)
    script = tmp_path / "questions.txt"
    script.write_text("\n".join(script_lines) + "\n", encoding="utf-8")
    run = cli("--model", str(DEMO_MODEL), "--device", "cpu", "--script", str(script), "--no-stats", "--plain")
    assert run.returncode == 0, run.stdout + run.stderr
    got = transcript_answers(run.stdout)
    wrong = [
        (question, want, have)
        for question, wants in expected.items()
        for want, have in zip(wants, got.get(question, []) + [""] * len(wants))
        if not answers_match(have, want)
    ]
    assert not wrong, f"wrong answers (question, expected, got): {wrong}\n{run.stdout}"
    assert sum(len(v) for v in got.values()) == sum(len(turns) for _, turns in conversations)


def test_one_shot_json_answers_a_fixed_scene(scene_files):
    seed, question, answer = ONE_SHOT
    run = cli("--model", str(DEMO_MODEL), "--image", str(scene_files[seed]), "-p", question, "--json", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["finish_reason"] == "stop"
    assert answers_match(out["text"], answer), f"{question!r} on scene {seed}: expected {answer!r}, got {out['text']!r}"
