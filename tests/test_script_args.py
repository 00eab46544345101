"""The scripts' arguments: a bad number or device is one line before any work (argparse's usage and
`error: argument …`, status 2), an app error one line `error: …` (status 1), never a traceback; and
`eval_demo_model.py --quantized rtn` quantizes (its calibration scenes are AWQ's only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import eval_demo_model
import script_args

REPO = Path(__file__).resolve().parent.parent


# each with a second mistake found later (an unknown section, a missing model): the code before this
# check went on to it, or to a traceback, quickly, instead of running a benchmark
NO_MODEL = "/nonexistent-model"


@pytest.mark.parametrize("argv, flag", [
    (["bench.py", "--threads", "-1", "--sections", "bogus"], "--threads"),
    (["bench.py", "--threads", "0", "--sections", "bogus"], "--threads"),
    (["bench.py", "--device", "cuda:x", "--sections", "bogus"], "--device"),
    (["bench.py", "--time-budget", "nan", "--sections", "bogus"], "--time-budget"),
    (["bench.py", "--gemv-rows", "x", "--sections", "bogus"], "--gemv-rows"),
    (["bench.py", "--gemv-rows", "0,4", "--sections", "bogus"], "--gemv-rows"),
    (["bench.py", "--sweep-budget", "-1", "--sections", "bogus"], "--sweep-budget"),
    (["bench_gemv_ab.py", NO_MODEL, "--rounds", "0"], "--rounds"),
    (["bench_gemv_ab.py", NO_MODEL, "--threads", "-1"], "--threads"),
    (["bench_quantize.py", "--blocks", "0", "--methods", "bogus"], "--blocks"),
    (["bench_quantize.py", "--samples", "-1", "--methods", "bogus"], "--samples"),
    (["bench_retry_ab.py", "--threads", "-1"], "--threads"),
    (["bench_w4_cpu_ab.py", "--threads", "0"], "--threads"),
    (["bench_vision_dtype_ab.py", "--threads", "0"], "--threads"),
    (["bench_serve.py", "--repeats", "0", "--model", NO_MODEL], "--repeats"),
    (["bench_serve.py", "--seconds", "inf", "--model", NO_MODEL], "--seconds"),
    (["eval_demo_model.py", "--calib-scenes", "-1", "--model", NO_MODEL], "--calib-scenes"),
    (["eval_demo_model.py", "--show-mistakes", "-1", "--model", NO_MODEL], "--show-mistakes"),
    (["eval_demo_model.py", "--per-type", "\u0661", "--model", NO_MODEL], "--per-type"),
    (["train_demo_model.py", "--out", "/dev/null/x", "--steps", "0", "--init", NO_MODEL], "--steps"),
    (["train_demo_model.py", "--out", "/dev/null/x", "--minutes", "0", "--init", NO_MODEL], "--minutes"),
    (["train_demo_model.py", "--out", "/dev/null/x", "--steps", "1", "--batch-size", "0", "--init", NO_MODEL], "--batch-size"),
    (["train_demo_model.py", "--out", "/dev/null/x", "--steps", "1", "--max-turns", "9", "--init", NO_MODEL], "--max-turns"),
    (["train_demo_model.py", "--out", "/dev/null/x", "--steps", "1", "--init", NO_MODEL], "--init"),
    (["fuzz_parsers.py", "--timeout", "0", "--targets", "bogus"], "--timeout"),
    (["fuzz_parsers.py", "--iterations", "-1", "--targets", "bogus"], "--iterations"),
    (["make_tiny_checkpoint.py", "--out", "/dev/null/x", "--format", "sharded", "--shards", "0"], "--shards"),
    (["lm_eval_check.py", "--batch-size", "0", "--venv", NO_MODEL, "--python", NO_MODEL], "--batch-size"),
    (["lm_eval_check.py", "--venv", NO_MODEL, "--python", NO_MODEL], "--python"),
    (["eval_demo_model.py", "--json", "/nonexistent-folder/r.json", "--model", NO_MODEL], "--json"),
    (["bench_quantize.py", "--json", "/nonexistent-folder/r.json", "--methods", "bogus"], "--json"),
    (["bench_serve.py", "--out", "/nonexistent-folder/r.json", "--model", NO_MODEL], "--out"),
])  # fmt: skip
def test_a_bad_number_or_device_is_one_line_before_any_work(argv, flag):
    script, *args = argv
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"{script}: error: argument {flag}: "), done.stderr


@pytest.mark.parametrize("script", ["bench_gemv_ab.py", "bench_serve.py"])
def test_a_missing_checkpoint_is_one_line(script, tmp_path):
    args = [str(tmp_path / "none")] if script == "bench_gemv_ab.py" else ["--model", str(tmp_path / "none")]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stderr.count("\n")) == (1, 1), done.stderr
    assert done.stderr.startswith("error: model folder ") and "does not exist" in done.stderr


def test_rows_given_as_text_are_checked():
    import bench

    assert bench._rows("1, 16,128") == (1, 16, 128)
    for bad in ("0", "x", "-2", ","):
        with pytest.raises(SystemExit, match="rows M must be"):
            bench._rows(bad)


def test_numbers_are_read_as_the_app_reads_them():
    assert script_args.positive_int(" 3 ") == 3 and script_args.seconds("0") == 0.0
    for bad in ("1_0", "1.5", "", "nan", "\u0661"):
        with pytest.raises(script_args.argparse.ArgumentTypeError):
            script_args.positive_int(bad)
    for bad in ("nan", "inf", "1e999", "-0.5"):
        with pytest.raises(script_args.argparse.ArgumentTypeError):
            script_args.seconds(bad)


@pytest.mark.parametrize("method, calibrated", [("rtn", False), ("awq", True)])
def test_eval_quantizes_with_rtn_without_calibration_scenes(method, calibrated, tmp_path, monkeypatch):
    """`eval_demo_model.py --quantized rtn` handed RTN its calibration scenes, which the quantizer
    refuses ("--calib is for --method awq"): every RTN evaluation failed at once."""
    import internvl_chat.quantize as quantize

    seen = {}

    def fake_quantize(src, dst, *, method, group_size, calib_dir, device):
        seen.update(method=method, calib_dir=calib_dir)
        return dst

    monkeypatch.setattr(quantize, "quantize_checkpoint", fake_quantize)
    monkeypatch.setattr(eval_demo_model, "write_calibration_scenes", lambda folder, count: folder)
    eval_demo_model.quantized_checkpoint(eval_demo_model.DEFAULT_MODEL, method, tmp_path, 64, "cpu", 16)
    assert seen["method"] == method and (seen["calib_dir"] is not None) == calibrated


def _documented_commands(text: str, script: str) -> list[list[str]]:
    """The argument lists of `python scripts/SCRIPT …` lines in `text` (a trailing backslash continues)."""
    import shlex

    joined = text.replace("\\\n", " ")
    return [shlex.split(line.split(f"scripts/{script}", 1)[1]) for line in joined.splitlines() if f"python scripts/{script} " in line]


def test_the_training_scripts_documented_commands_parse(monkeypatch):
    """`--curriculum-steps 0` (no curriculum: hard scenes from the first step), in the script's own
    docstring and benchmarks/RESULTS.md's continued training, was refused as "must be a whole number ≥ 1"."""
    import train_demo_model

    monkeypatch.chdir(REPO)  # --init internvl_chat/demo_model
    commands = _documented_commands(train_demo_model.__doc__, "train_demo_model.py")
    commands += _documented_commands((REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8"), "train_demo_model.py")
    assert any("--curriculum-steps" in argv for argv in commands), commands
    for argv in commands:
        args = train_demo_model.parse_args(argv)
        assert args.out is not None
    assert train_demo_model.parse_args(["--out", "x", "--steps", "1", "--curriculum-steps", "0"]).curriculum_steps == 0


@pytest.mark.parametrize("argv, flag", [
    (["train_demo_model.py", "--out", "/dev/null/x", "--steps", "1", "--init", "/no\nsuch\x1b[31m"], "--init"),
    (["lm_eval_check.py", "--venv", "/no\nvenv\x1b[31m", "--python", "/no\npython\x1b[31m"], "--python"),
])  # fmt: skip
def test_a_refused_path_is_shown_escaped_on_one_line(argv, flag):
    """The paths these checks name were printed as given: a newline split the error in two, an escape
    sequence reached the terminal."""
    script, *args = argv
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "\x1b" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"{script}: error: argument {flag}: /no\\nsuch" if flag == "--init" else
                           f"{script}: error: argument {flag}: /no\\npython"), done.stderr


HOSTILE = "a\x1b]8;;http://x\x07b\x1b[31mred\u202e\nforged"


def _raw_error():
    """An app error whose message carries text as it was given: OneLineParser's carries the unknown
    flag as typed, and the CLI escapes it where it prints it (cli.py's _print_error)."""
    from internvl_chat.errors import OneLineParser

    OneLineParser(prog="x").parse_args([f"--{HOSTILE}"])


def _inert_line(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("error: "), repr(err)
    assert not any(c in err[:-1] for c in "\x1b\x07\u202e\n"), repr(err)
    assert "a\\e]8;;http://x\\x07b\\e[31mred\\u202e\\nforged" in err, err


def test_a_scripts_app_error_is_printed_inert(capsys):
    """one_line_errors printed the message raw: an escape sequence reached the terminal, a newline
    began a line of its own."""
    def main():
        _raw_error()

    assert script_args.one_line_errors(main) == 1
    _inert_line(capsys.readouterr().err)


def test_an_evaluations_app_error_is_printed_inert(capsys, monkeypatch):
    def fails(*args, **kwargs):
        _raw_error()

    monkeypatch.setattr(eval_demo_model, "evaluate_full", fails)
    assert eval_demo_model.main(["--model", NO_MODEL]) == 1
    _inert_line(capsys.readouterr().err)
