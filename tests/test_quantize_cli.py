"""`internvl-chat quantize` as a command: refusals before any work, atomic output, progress, help."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from internvl_chat import cli
from internvl_chat.engine.config import load_config
from internvl_chat.errors import EndedBySignal, UsageError
from internvl_chat.quantize import BarProgress, Progress, build_parser, check_group_size, quantize_checkpoint

REPO = Path(__file__).resolve().parent.parent


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the command sets it for torch; undone after the test
    code = cli.main(["quantize", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def config_only(tiny_original, tmp_path) -> Path:
    """The tiny model's config.json without any weights: whatever is refused with it was refused before loading."""
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy2(tiny_original / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("which, line", [
    ("src", "SRC was given an empty path; pass a 16-bit checkpoint folder"),  # was "the source . has no config.json"
    ("dst", "DST was given an empty path; pass a new output folder"),  # was "output /cwd exists and is not empty"
    ("--calib", "--calib was given an empty path; pass a folder"),  # was quantized on the built-in data
    ("--device", "--device was given an empty value; pass auto, cpu, cuda or cuda:N"),  # was the default device
])  # fmt: skip
def test_an_empty_argument_is_refused_not_taken_as_the_working_folder_or_left_out(which, line, config_only, tmp_path,
                                                                                  monkeypatch, capsys):  # fmt: skip
    args = ["" if which == "src" else config_only, "" if which == "dst" else tmp_path / "out"]
    args += [which, ""] if which.startswith("--") else []
    code, lines = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"internvl-chat: error: {line}"), lines
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide_the_widths_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys):
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--group-size", "48")
    assert code == 2
    assert len(lines) == 1 and "group size 48 does not divide the model's hidden size 64; use 64 or 32" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["16", "8", "1"])
def test_a_group_size_the_loader_refuses_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys, size):
    """16 divides the tiny model's widths, so the whole run went through and wrote a checkpoint that
    loading refused ('AWQ group size 16 is not supported; use a multiple of 32')."""
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--group-size", size)
    assert code == 2
    assert len(lines) == 1 and f"group size {size} is not a multiple of 32" in lines[0] and "use 64 or 32" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


@pytest.mark.parametrize("value", ["0", "-32", "abc"])
def test_bad_flag_values_are_one_line(config_only, tmp_path, monkeypatch, capsys, value):
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--group-size", value)
    assert code == 2 and len(lines) == 1 and "--group-size" in lines[0] and "--help" in lines[0], lines


def test_an_absurd_sample_count_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys):
    """--samples 10**9 used to build calibration samples until memory ran out (a MemoryError traceback)."""
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--samples", str(10**9))
    assert code == 2 and len(lines) == 1 and "--samples" in lines[0] and "at most" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [None, 16])
def test_a_model_whose_widths_no_loadable_group_size_divides(tiny_original, size):
    """Widths of 48 and 96: the default refusal advised '--group-size N that divides them', and 16 or
    48 then made a checkpoint the loader refuses; no group size can work."""
    import dataclasses

    cfg = load_config(tiny_original)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_size=48, num_heads=3, num_kv_heads=1,
                                                            head_dim=16, intermediate_size=96))  # fmt: skip
    with pytest.raises(UsageError) as err:
        check_group_size(cfg, size)
    assert "(48, 48, 96) are not all multiples of 32" in str(err.value) and "cannot be quantized" in str(err.value)


def test_default_group_size_is_128_where_it_divides_else_the_largest_that_does():
    demo = load_config(REPO / "internvl_chat" / "demo_model")  # widths 192 and 512
    assert check_group_size(demo, None) == 64
    import bench_lib

    one_b = bench_lib.shape_config("InternVL3-1B", w4=False)  # 896 and 4864
    assert check_group_size(one_b, None) == 128
    assert check_group_size(one_b, 64) == 64


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help and action.help.strip(), action.dest


@pytest.mark.parametrize("flag", ["--group-size", "--samples"])
def test_a_count_in_other_digits_is_refused_as_every_number_flag_refuses_it(flag):
    # int() read `--samples ٣٢` as 32, a number the command line did not show (its own type, not argparse's int)
    with pytest.raises(UsageError, match=r"digits 0-9, not '\\u0663\\u0662'"):
        build_parser().parse_args(["src", "dst", flag, "\u0663\u0662"])
    assert getattr(build_parser().parse_args(["src", "dst", flag, " 64 "]), flag[2:].replace("-", "_")) == 64


@pytest.mark.parametrize("flag", ["--group-size", "--samples"])
def test_a_count_int_reads_but_no_one_types_is_refused_naming_it(flag):
    # int() read `--samples 1_6` as 16
    with pytest.raises(UsageError, match=rf"^argument {flag}: must be a whole number, not '1_6'; see "):
        build_parser().parse_args(["src", "dst", flag, "1_6"])


@pytest.mark.parametrize("kind", ["not empty", "a file", "under a file", "a symlink", "not writable"])
def test_unusable_output_is_refused_in_one_line_before_loading(config_only, tmp_path, monkeypatch, capsys, kind):
    dst = tmp_path / "out"
    if kind == "not empty":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
        expected = "exists and is not empty"
    elif kind == "a file":
        dst.write_text("mine")
        expected = "exists and is not a folder"
    elif kind == "under a file":
        (tmp_path / "file").write_text("mine")
        dst = tmp_path / "file" / "out"
        expected = "cannot write the output"
    elif kind == "a symlink":
        (tmp_path / "elsewhere").mkdir()
        dst.symlink_to(tmp_path / "elsewhere")
        expected = "is a symlink"
    else:  # not even root can make a folder in /proc
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        dst = Path("/proc/internvl-quantize-test")
        expected = "cannot write the output /proc/internvl-quantize-test in /proc"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, lines = run_cli(monkeypatch, capsys, config_only, dst)
    assert code == 2
    assert len(lines) == 1 and expected in lines[0], lines
    assert ".partial" not in lines[0]  # the user's path, never the staging folder's
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    if kind == "not empty":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]


class InterruptWhile(Progress):
    """Ctrl-C as the user would press it: a KeyboardInterrupt raised in the middle of `phase`."""

    def __init__(self, phase: str):
        self.phase_name = phase

    def update(self, name, done, total, unit, detail):
        if name == self.phase_name and done >= 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["AWQ search", "writing"])
def test_ctrl_c_leaves_no_output_folder_and_no_partial_files(tiny_original, tmp_path, phase):
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_original, dst, "awq", group_size=32, samples=2, device="cpu", progress=InterruptWhile(phase))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its hidden staging folder


def test_an_existing_empty_output_folder_is_filled(tiny_original, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu")
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("positions", [2048, 64])
def test_a_model_with_fewer_positions_than_the_quantizer_s_cache(tiny_original, tmp_path, monkeypatch, capsys, positions):
    """quantize sized its cache at 4096 tokens, so a model of 2048 positions was refused with advice
    to lower --max-context, a flag quantize does not have; the cache now fits the model, and
    calibration samples longer than the model's positions (64) are cut to them."""
    src = tmp_path / "short"
    shutil.copytree(tiny_original, src)
    raw = json.loads((src / "config.json").read_text())
    raw["llm_config"]["max_position_embeddings"] = positions
    (src / "config.json").write_text(json.dumps(raw))
    code, lines = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--samples", "2", "--group-size", "32", "--device", "cpu")
    assert code == 0, lines
    assert load_config(tmp_path / "out").quant is not None


def test_non_terminal_progress_is_a_few_plain_lines_with_real_totals(tiny_original, tmp_path, monkeypatch, capsys):
    code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--group-size", "32", "--samples", "2")
    assert code == 0, lines
    phases = [line.split(":")[1].strip() for line in lines[:-1]]
    assert phases == ["loading", "calibration data", "calibration forward", "AWQ search", "writing"], lines
    assert "quantize: AWQ search: 2 blocks in" in lines[3] and "quantize: calibration forward: 2 samples in" in lines[2]
    assert lines[-1].startswith(f"wrote {tmp_path / 'out'} (awq, group 32) in ")
    assert not any("?" in line or "\x1b" in line for line in lines), lines


def test_terminal_progress_draws_every_phase_with_its_total(tiny_original, tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150, color_system=None)
    with BarProgress(console) as bars:
        quantize_checkpoint(tiny_original, tmp_path / "out", "awq", group_size=32, samples=4, device="cpu", progress=bars)
    text = screen.getvalue()
    for shown in ("loading", "1/1 model", "calibration data", "4/4 samples", "calibration forward", "AWQ search", "2/2 blocks",
                  "writing", "6/6 files"):  # fmt: skip
        assert shown in text, shown
    assert "/?" not in text and "0/?" not in text


def test_rtn_needs_no_calibration(tiny_original, tmp_path):
    seen = []

    class Record(Progress):
        def begin(self, name, total, unit):
            seen.append((name, total, unit))

    quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu", progress=Record())
    # every file of the output counted ("writing: 2 files" for the six the tiny model's output holds)
    written = len(list((tmp_path / "out").iterdir()))
    assert written == 6 and seen == [("loading", 1, "model"), ("RTN", 2, "blocks"), ("writing", written, "files")]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["llm_config"]["quantization_config"]["group_size"] == 32


def test_calibration_data_with_rtn_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys):
    """RTN uses no calibration data: --calib with it was silently ignored, so the user believed theirs was used."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.txt").write_text("some text\n", encoding="utf-8")
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn", "--calib", calib)
    assert code == 2 and len(lines) == 1, lines
    assert "--calib is for --method awq" in lines[0] and "drop --calib or use --method awq" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named", [
    (["--samples", "8"], "--samples is for"),
    (["--seed", "0"], "--seed is for"),  # given, even at its default value
    (["--no-clip"], "--no-clip is for"),
    (["--no-clip", "--samples", "4"], "--samples, --no-clip are for"),
])  # fmt: skip
def test_other_awq_flags_with_rtn_are_refused_before_loading(config_only, tmp_path, monkeypatch, capsys, flags, named):
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn", *flags)
    assert code == 2 and len(lines) == 1 and named in lines[0] and "or use --method awq" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_missing_source_is_named_without_flags_of_other_commands(tmp_path, monkeypatch, capsys):
    code, lines = run_cli(monkeypatch, capsys, tmp_path / "missing", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "the source" in lines[0] and "missing is not a folder" in lines[0] and "--model" not in lines[0]


@pytest.mark.parametrize("where", ["src", "dst", "calib"])
def test_an_unknown_users_home_is_one_line(config_only, tmp_path, monkeypatch, capsys, where):
    """`~nosuchuser/…` used to end in Path.expanduser's RuntimeError traceback."""
    bad = "~internvl-chat-no-such-user/x"
    args = {"src": [bad, tmp_path / "out"], "dst": [config_only, bad],
            "calib": [config_only, tmp_path / "out", "--calib", bad]}[where]  # fmt: skip
    code, lines = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and len(lines) == 1 and "there is no user 'internvl-chat-no-such-user'" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure", ["disk full", "source unreadable"])
def test_a_failed_write_is_one_line_and_leaves_nothing(tiny_original, tmp_path, monkeypatch, capsys, failure):
    """An OSError while writing the output (a full disk, a tokenizer file of the source that cannot be
    read) escaped as a traceback; the staging folder was removed, but the user saw Python's insides."""
    import errno
    import os

    import internvl_chat.quantize.writer as writer

    if failure == "disk full":
        def fail(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(writer, "save_file", fail)
        expected = ["cannot write the output", str(tmp_path / "out"), "No space left on device", "free some disk space"]
    else:
        copy = shutil.copy2

        def fail(source, target, *args, **kwargs):
            if Path(source).name == "tokenizer.json":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))
            return copy(source, target, *args, **kwargs)

        monkeypatch.setattr(writer.shutil, "copy2", fail)
        expected = ["cannot read", str(tiny_original / "tokenizer.json"), "Permission denied"]
    code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--method", "rtn", "--device", "cpu",
                          "--group-size", "32")  # fmt: skip
    assert code == 2
    errors = [line for line in lines if line.startswith("internvl-chat:")]
    assert len(errors) == 1 and all(word in errors[0] for word in expected), lines
    assert ".partial" not in errors[0] and not any("Traceback" in line for line in lines), lines
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


def test_a_source_file_the_output_cannot_hold_is_a_failed_write(tiny_original, tmp_path):
    """A copied source file that a file-size limit (`ulimit -f`; a full disk alike) stopped was
    "cannot read SRC/generation_config.json (File too large); check the file and its permissions":
    a failed copy names the source file whichever side failed."""
    import resource
    import subprocess
    import sys

    src = tmp_path / "src"
    shutil.copytree(tiny_original, src)
    (src / "generation_config.json").write_text("{}" + " " * (2 << 20))  # larger than the output's weight file
    limit = 1 << 20
    assert (tiny_original / "model.safetensors").stat().st_size < limit

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "internvl_chat", "quantize", str(src), str(tmp_path / "out"), "--method", "rtn",
                           "--device", "cpu", "--group-size", "32"], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=limit_file_size, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"internvl-chat: error: cannot write the output {tmp_path / 'out'} (File too large); "
                                                    "check the disk or choose another output folder"), done.stderr  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_source_config_with_a_lone_surrogate_escape_is_written_back_as_it_was(tiny_original, tmp_path, monkeypatch, capsys):
    """A "\\ud800" escape under a key the engine never reads passes load_config; writing the output
    config.json as UTF-8 then failed with a UnicodeEncodeError traceback at the very end of the run."""
    src = tmp_path / "src"
    shutil.copytree(tiny_original, src)
    text = (src / "config.json").read_text(encoding="utf-8")
    (src / "config.json").write_text(text.replace("{", '{"notes": "\\ud800 caf\\u00e9", ', 1), encoding="utf-8")
    code, lines = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--method", "rtn", "--device", "cpu", "--group-size", "32")
    assert code == 0, lines
    raw = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert raw["notes"] == "\ud800 café" and raw["llm_config"]["quantization_config"]["group_size"] == 32
    load_config(tmp_path / "out")


def test_a_failed_run_removes_the_parent_folders_it_made(config_only, tiny_original, tmp_path, monkeypatch, capsys):
    """The output's missing parent folders are made with the staging folder; a run that failed (here:
    no weights) or was interrupted removed the staging folder but left `a/b/` behind."""
    before = sorted(p.name for p in tmp_path.iterdir())
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "a" / "b" / "out", "--method", "rtn")
    assert code == 2 and "no weights" in lines[-1], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "a").mkdir()  # a folder that was there stays
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_original, tmp_path / "a" / "b" / "c" / "out", "awq", group_size=32, samples=2,
                            device="cpu", progress=InterruptWhile("AWQ search"))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "a"]) and list((tmp_path / "a").iterdir()) == []


@pytest.mark.parametrize("name, shown", [
    ("language_model.model.layers.0.self_attn.k_proj.weight", "layers.0.self_attn.{q,k,v}_proj.weight"),
    ("language_model.model.layers.1.input_layernorm.weight", "layers.1.input_layernorm.weight"),
])  # fmt: skip
def test_a_source_with_nan_weights_is_refused_before_quantizing(tiny_original, tmp_path, monkeypatch, capsys, name, shown):
    """A NaN in the source was quantized without a word into a NaN scale (RTN and AWQ alike); the
    output then failed in chat with advice to re-download it."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_original, src)
    state = load_file(src / "model.safetensors")
    state[name][0] = float("nan")
    save_file(state, src / "model.safetensors")
    code, lines = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--method", "rtn", "--device", "cpu", "--group-size", "32")
    assert code == 2 and shown in lines[-1] and "NaN" in lines[-1] and "download it again" in lines[-1], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_weight_file_the_disk_cannot_hold_is_one_line_and_leaves_nothing(tiny_original, tmp_path, monkeypatch, capsys):
    """safetensors reports a failed write as its own SafetensorError ('… No space left on device (os
    error 28)'), not an OSError, so a full disk ended the run in a traceback. A file size limit makes
    the library's real write fail here (EFBIG) without a small file system to fill."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))  # the weights are ~0.5 MiB; Python ignores SIGXFSZ
    try:
        code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--method", "rtn", "--device", "cpu",
                              "--group-size", "32")  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("internvl-chat:")]
    assert len(errors) == 1 and f"cannot write the output {tmp_path / 'out'} (File too large)" in errors[0], lines
    assert ".partial" not in errors[0] and not any("Traceback" in line for line in lines), lines
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


@pytest.mark.parametrize("shards", [False, True])
def test_the_weight_files_are_as_readable_as_the_rest_of_the_checkpoint(tiny_original, tmp_path, monkeypatch, shards):
    """safetensors writes its files 0600 whatever the umask: the config and tokenizer of the output
    were readable by others and its weights not (a server run as another user could not load it)."""
    import os
    import stat

    import internvl_chat.quantize.writer as writer

    if shards:
        monkeypatch.setattr(writer, "SHARD_BYTES", 64 * 1024)
    old = os.umask(0o022)
    try:
        quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu")
    finally:
        os.umask(old)
    weights = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(weights) > 1 if shards else len(weights) == 1
    for path in [*weights, tmp_path / "out" / "config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_a_damaged_calibration_image_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys, damage):
    """--calib images were decoded only while building the samples, after the model had loaded
    (minutes for a large one); a source without weights shows that nothing is loaded first."""
    import io as bytes_io

    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(calib / "a.png")
    png = bytes_io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(png, "PNG")
    (calib / "b.png").write_bytes(b"not a picture" if damage == "not an image" else png.getvalue()[: len(png.getvalue()) // 2])
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--calib", calib, "--samples", "4")
    assert code == 2 and len(lines) == 1 and str(calib / "b.png") in lines[0], lines
    assert ("is text, not an image" if damage == "not an image" else "truncated or corrupt") in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "no_weights"]


@pytest.mark.parametrize("target, words", [("missing.png", "is a link to a file that does not exist"), ("/dev/zero", "is not a regular file")])
def test_a_calibration_image_that_is_no_file_is_named_before_loading(config_only, tmp_path, monkeypatch, capsys, target, words):
    """A broken link (an interrupted copy, a cloud placeholder) or a device named .png was dropped
    without a word: the run calibrated on fewer images than given, or on text alone."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.txt").write_text("a line of calibration text")
    (calib / "b.png").symlink_to(target)
    (calib / "folder.png").mkdir()  # a folder is no image: passed over as before
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--calib", calib, "--samples", "4")
    assert code == 2 and len(lines) == 1 and str(calib / "b.png") in lines[0] and words in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "no_weights"]


def _phases_of_a_run(src, out, calib, samples: int) -> list[tuple]:
    """An AWQ run of `src` calibrated on `calib`: the (name, total, unit) of each progress phase."""
    seen = []

    class Record(Progress):
        def begin(self, name, total, unit):
            seen.append((name, total, unit))

    quantize_checkpoint(src, out, "awq", group_size=32, samples=samples, calib_dir=calib, device="cpu", progress=Record())
    return seen


def test_calibration_images_are_the_ones_the_samples_use(tiny_original, tmp_path):
    """Each of the first ⌈samples/2⌉ images is decoded once, before loading; the others are not read."""
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(5):
        Image.new("RGB", (64 + 16 * i, 64), (40 * i, 30, 30)).save(calib / f"{i}.png")
    (calib / "notes.txt").write_text("caf\u00e9 " * 10)
    seen = _phases_of_a_run(tiny_original, tmp_path / "out", calib, samples=5)
    assert seen[:3] == [("calibration images", 3, "images"), ("loading", 1, "model"), ("calibration data", 5, "samples")]


@pytest.mark.parametrize("with_images", [False, True])
def test_calibration_texts_replace_the_built_in_ones(tiny_loaded_tokenizer, with_images):
    """A --calib folder's .txt files joined the 12 built-in texts: with one file of the user's own
    domain, about 12 samples in 13 were answered with generic built-in text instead."""
    from internvl_chat.chat.template import PromptBuilder
    from internvl_chat.quantize.calibration import Calibration, calibration_samples

    builder = PromptBuilder(tiny_loaded_tokenizer, None, tokens_per_tile=4)
    mine = ["Torque the M8 flange bolts to 25 N·m in a star pattern.", "Replace the gasket every 500 hours."]
    tiles = [torch.zeros(1, 3, 448, 448)] if with_images else []
    samples = calibration_samples(builder, tiny_loaded_tokenizer, 12, calib=Calibration(tiles, mine))
    endings = [tiny_loaded_tokenizer.decode(s.ids) for s in samples]
    assert all(any(text.endswith(m) for m in mine) for text in endings), endings


def test_a_source_without_config_json_is_named_without_the_chat_s_flag(tmp_path, monkeypatch, capsys):
    """The loader's message advised 'point --model at …', a flag quantize does not have."""
    (tmp_path / "src").mkdir()
    code, lines = run_cli(monkeypatch, capsys, tmp_path / "src", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and f"the source {tmp_path / 'src'} has no config.json" in lines[0], lines
    assert "--model" not in lines[0] and not (tmp_path / "out").exists()


def test_a_hugging_face_model_id_as_the_source_says_to_download_it(tmp_path, monkeypatch, capsys):
    """It was told "is not a folder; give a 16-bit checkpoint folder", read as a typo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, lines = run_cli(monkeypatch, capsys, "OpenGVLab/InternVL3-1B", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "the source OpenGVLab/InternVL3-1B does not exist; internvl-chat does not download models" in lines[0], lines
    assert "(hf download OpenGVLab/InternVL3-1B) and give the folder it prints" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("given, advice", [
    ("https://huggingface.co/OpenGVLab/InternVL3-1B", "internvl-chat does not download models"),
    ("https://example.com/model", "give a 16-bit checkpoint folder"),
])
def test_a_web_address_as_the_source_is_named_as_typed(tmp_path, monkeypatch, capsys, given, advice):
    """As the Path it became, the address lost a slash: "the source https:/huggingface.co/… does not exist"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, lines = run_cli(monkeypatch, capsys, given, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert f"the source {given} does not exist; {advice}" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_output_or_calib_folder_typed_as_a_web_address_is_refused_as_typed(tiny_original, tmp_path, monkeypatch, capsys):
    """The output went to a local folder `https:/example.com/out`; --calib said "https:/… is not a folder"."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(monkeypatch, capsys, tiny_original, "https://example.com/out", "--method", "rtn")
    assert code == 2 and lines == ["internvl-chat: error: the output folder https://example.com/out is a web address; "
                                   "give a local folder to write to"], lines  # fmt: skip
    code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--calib", "https://example.com/calib")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith("--calib https://example.com/calib is a web address; internvl-chat reads local files only: "
                             "download them and give their folder"), lines  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_weight_file_as_the_source_names_its_folder(tiny_original, tmp_path, monkeypatch, capsys):
    code, lines = run_cli(monkeypatch, capsys, tiny_original / "model.safetensors", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"the source {tiny_original / 'model.safetensors'} is not a folder; give a 16-bit checkpoint folder "
                             f"({tiny_original} holds it)"), lines  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_tinychat_source_is_already_quantized_before_loading(config_only, tmp_path, monkeypatch, capsys):
    """An llm-awq `*-awq-v2.pt` is 4-bit whatever its config.json says (llm-awq ships the original
    config): it was loaded and converted in full before being refused (or failed in the conversion)."""
    (config_only / "model-w4-g128-awq-v2.pt").write_bytes(b"not read")
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1 and "already quantized" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


def test_an_unreadable_source_file_that_is_copied_is_refused_before_loading(config_only, tiny_original, tmp_path, monkeypatch, capsys):
    """generation_config.json, chat_template.jinja & co. are only copied at the very end: one that
    could not be read ended a whole run with nothing written."""
    import builtins
    import errno
    import os

    shutil.copy2(tiny_original / "generation_config.json", config_only / "generation_config.json")
    real_open = builtins.open

    def refuse(file, *args, **kwargs):  # as for a file of another user (root reads everything)
        if Path(str(file)).name == "generation_config.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1, lines
    assert f"cannot read {config_only / 'generation_config.json'} (Permission denied)" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


@pytest.mark.parametrize("name", ["preprocessor_config.json", "chat_template.jinja"])
def test_a_source_settings_file_that_is_a_pipe_is_named_before_loading(config_only, tmp_path, monkeypatch, capsys, name):
    """A pipe (or a device) under a settings file's name was skipped without a word: the output went
    without that file. Named before loading, without opening it (a pipe would block the open)."""
    import os

    os.mkfifo(config_only / name)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1, lines
    assert f"{config_only / name} is not a regular file (a pipe or a device?); remove it from the source folder" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


def test_an_empty_output_folder_that_cannot_be_renamed_over_is_filled(tiny_original, tmp_path, monkeypatch):
    """The checkpoint was written next to the output folder and renamed over it at the end: where
    the folder is a mount point (a fresh disk) that rename fails (EBUSY), so the whole run was lost,
    after filling the disk above. An existing empty folder is now filled from inside."""
    import errno
    import os

    import internvl_chat.quantize.output_folder as output_folder

    dst = tmp_path / "disk"
    dst.mkdir()
    rename = os.rename

    def like_a_mount_point(source, target, *args, **kwargs):
        if Path(target) == dst:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(target))
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(output_folder.os, "rename", like_a_mount_point)
    quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk"]
    assert (dst / "model.safetensors").is_file() and not any(p.name.startswith(".") for p in dst.iterdir())
    assert load_config(dst).quant is not None


def interrupt_the_second_rename(monkeypatch) -> None:
    """A Ctrl-C at quantize's second rename: after the first file is moved into an existing output folder."""
    import internvl_chat.quantize.output_folder as output_folder

    rename, calls = os.rename, []

    def interrupted(source, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(output_folder.os, "rename", interrupted)


@pytest.mark.parametrize("when", ["writing", "moving"])
def test_ctrl_c_leaves_an_existing_empty_output_folder_empty(tiny_original, tmp_path, monkeypatch, when):
    dst = tmp_path / "out"
    dst.mkdir()
    progress = Progress()
    if when == "writing":
        progress = InterruptWhile("writing")
    else:  # after the first file is moved into the folder
        interrupt_the_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu", progress=progress)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list(dst.iterdir()) == []


@pytest.mark.parametrize("name, value, shown", [
    ("language_model.model.layers.1.post_attention_layernorm.weight", 1e5,
     "the source checkpoint's tensor language_model.model.layers.1.post_attention_layernorm.weight holds values beyond float16's range"),
    ("vision_model.encoder.layers.0.norm1.weight", -2e5, "tensor vision_model.encoder.layers.0.norm1.weight holds values beyond"),
    ("language_model.model.layers.0.mlp.down_proj.weight", 1e6,  # a group's range / 15 overflows its scale
     "the quantized tensor language_model.model.layers.0.mlp.down_proj.scales exceeds float16's range"),
])  # fmt: skip
def test_values_beyond_float16_are_refused_not_written_as_inf(tiny_original, tmp_path, monkeypatch, capsys, name, value, shown):
    """bf16 holds values up to 3e38, the AWQ layout's float16 only to 65,504: such a tensor was
    written as inf without a word, and the output then failed in chat with advice to re-download it."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_original, src)
    state = load_file(src / "model.safetensors")
    assert state[name].dtype == torch.bfloat16
    state[name].view(-1)[3] = value  # one value
    save_file(state, src / "model.safetensors")
    code, lines = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--method", "rtn", "--device", "cpu", "--group-size", "32")
    assert code == 2 and shown in lines[-1] and "±65,504" in lines[-1] and "keep this model in 16 bits" in lines[-1], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_nan_past_the_first_slice_of_a_large_tensor_is_found():
    """The source check reads tensors in slices of 2**24 values; a NaN in a later one must not be
    lost in taking the largest magnitude over the slices."""
    from types import SimpleNamespace

    from internvl_chat.errors import CheckpointError
    from internvl_chat.quantize import check_source_values

    model = torch.nn.Module()
    model.embed = torch.nn.Parameter(torch.zeros((1 << 24) + 8, dtype=torch.bfloat16), requires_grad=False)
    model.embed.data[-1] = float("nan")
    with pytest.raises(CheckpointError, match="holds NaN or inf values"):
        check_source_values(SimpleNamespace(model=model))


def test_an_output_folder_filled_by_someone_else_meanwhile_is_left_as_it_is(tiny_original, tmp_path):
    """Staged inside an existing empty folder, the files are moved up at the end; a move replaces a
    file of the same name, so a second run into the same folder would have mixed the two
    checkpoints (one's shards and index, the other's config)."""
    dst = tmp_path / "out"
    dst.mkdir()

    class Intruder(Progress):
        def begin(self, name, total, unit):
            if name == "writing":
                (dst / "config.json").write_text("theirs")

    with pytest.raises(UsageError, match="is no longer empty"):
        quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu", progress=Intruder())
    assert [p.name for p in dst.iterdir()] == ["config.json"] and (dst / "config.json").read_text() == "theirs"


def test_an_output_folder_holding_a_killed_run_s_staging_folder_says_so(config_only, tmp_path, monkeypatch, capsys):
    """A run killed outright (SIGKILL, the out-of-memory killer) leaves its hidden staging folder
    inside an existing output folder: 'exists and is not empty' of a folder `ls` shows empty."""
    dst = tmp_path / "out"
    (dst / ".out.k2j4x1.partial").mkdir(parents=True)
    code, lines = run_cli(monkeypatch, capsys, config_only, dst)
    assert code == 2 and len(lines) == 1, lines
    assert f"output {dst} holds only .out.k2j4x1.partial, left by a quantize run that was killed" in lines[0], lines
    assert [p.name for p in dst.iterdir()] == [".out.k2j4x1.partial"]


@pytest.mark.parametrize("below", ["out", "a/b/out"])
def test_an_output_below_a_file_names_the_file(config_only, tmp_path, monkeypatch, capsys, below):
    """mkdir's words were passed on: 'cannot write the output F/out in F (File exists); choose a
    folder you can write to' (or 'Not a directory' deeper down), which does not say what is wrong."""
    (tmp_path / "f").write_text("mine")
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "f" / below)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"cannot write the output {tmp_path / 'f' / below}: {tmp_path / 'f'} is not a folder; "
                             "choose another output folder"), lines  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "no_weights"] and (tmp_path / "f").read_text() == "mine"


def test_a_killed_run_s_staging_folder_beside_a_new_output_is_named(config_only, tiny_original, tmp_path, monkeypatch, capsys):
    """For a new output folder the staging folder is made beside it: one a killed run left there (a
    checkpoint's size, hidden from `ls`) stayed without a word while the next run made another, and
    a second run at once for the same output went all the way to fail at the rename."""
    (tmp_path / ".out.k2j4x1.partial").mkdir()
    (tmp_path / ".out.v2.k2j4x1.partial").mkdir()  # out.v2's, not out's
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"{tmp_path / '.out.k2j4x1.partial'} was left by a quantize run for {tmp_path / 'out'} that was killed "
                             "(or is still running); delete it, or choose a new output folder"), lines  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.k2j4x1.partial", ".out.v2.k2j4x1.partial", "no_weights"]
    (tmp_path / ".out.k2j4x1.partial").rmdir()
    quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu")
    assert load_config(tmp_path / "out").quant is not None


def test_a_new_output_in_a_folder_one_can_write_but_not_list_is_still_made(tmp_path, monkeypatch):
    """A drop-box folder (mode 0333: write and enter, not list) takes a new output as before: the
    look for a killed run's staging folder cannot list it, and refused the output as 'cannot write
    the output … (Permission denied); choose a folder you can write to'. (Root lists any folder,
    so the refusal to list is the test's.)"""
    from internvl_chat.quantize import output_folder

    listdir = os.listdir

    def unlistable(path="."):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(output_folder.os, "listdir", unlistable)
    staging = output_folder.staging_folder(tmp_path / "out")
    assert staging.parent == tmp_path and staging.name.startswith(".out.") and staging.is_dir()


@pytest.mark.parametrize("data, kind", [(b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"), (b"text\x00\x01\x02 more", "binary data")])
def test_a_calibration_text_that_holds_binary_data_is_refused(config_only, tmp_path, monkeypatch, capsys, data, kind):
    """An image or archive named .txt was tokenized as calibration text without a word."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "notes.txt").write_bytes(data)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--calib", calib)
    assert code == 2 and len(lines) == 1, lines
    assert f"calibration text {calib / 'notes.txt'} holds {kind}, not text; take it out of the --calib folder" in lines[0], lines


@pytest.mark.parametrize("data", [b"", b" \n\t\r\n", b"\xef\xbb\xbf\r\n"])  # the last: Notepad's "UTF-8 with BOM"
def test_a_calibration_text_that_holds_no_text_is_refused(config_only, tmp_path, monkeypatch, capsys, data):
    """An empty .txt file was taken as a calibration text: its samples were calibrated on an empty
    answer, and with no other .txt file every text sample was."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "notes.txt").write_bytes(data)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--calib", calib)
    assert code == 2 and len(lines) == 1, lines
    assert f"calibration text {calib / 'notes.txt'} is empty; write text into it or take it out of the --calib folder" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "no_weights"]  # refused before the output was claimed


def test_a_calibration_text_over_the_limit_says_what_is_used(config_only, tmp_path, monkeypatch, capsys):
    """A large corpus file was refused as "over the 1 MiB limit; is it the right file?": it was,
    and nothing said that only its first 2,000 characters would be used, nor what to do."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "corpus.txt").write_bytes(b"plain words " * 100_000)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--calib", calib)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"calibration text {calib / 'corpus.txt'} is over 1 MiB, and only its first 2,000 characters would "
                             "be used; put those in a smaller file (one text per file), or take it out of the --calib folder"), lines  # fmt: skip


def test_a_non_utf8_calibration_text_is_used_with_its_bad_bytes_replaced(tmp_path):
    from internvl_chat.quantize import calibration_files

    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 cr\xe8me")
    assert calibration_files(tmp_path) == ([], ["caf\ufffd cr\ufffdme"])


def test_a_calibration_folder_with_nothing_to_use_lists_the_extensions_in_order(tmp_path):
    """The list came in a set's order, which string hashing changes from run to run (.pfm, .jfif, .jpg, …)."""
    from internvl_chat.errors import UsageError
    from internvl_chat.quantize import calibration_files

    with pytest.raises(UsageError) as err:
        calibration_files(tmp_path)
    listed = str(err.value).split("has no images (")[1].split(") or .txt files")[0].split(", ")
    assert listed == sorted(listed) and ".png" in listed and ".jpg" in listed


def test_a_calibration_text_s_byte_order_mark_is_no_part_of_it(tmp_path):
    """Notepad's "UTF-8 with BOM" put U+FEFF at the start of the text the samples were calibrated on,
    and a file holding only the mark passed as one that holds text."""
    from internvl_chat.quantize import calibration_files

    (tmp_path / "notes.txt").write_bytes("\ufeffcaf\u00e9".encode())
    assert calibration_files(tmp_path) == ([], ["caf\u00e9"])


def test_a_folder_named_like_a_calibration_text_is_passed_over_as_one_named_like_an_image(tmp_path):
    """`notes.txt/` stopped the run ("is a folder, not a file; give a file") where `shots.png/` is passed over."""
    from internvl_chat.quantize import calibration_files

    (tmp_path / "notes.txt").mkdir()
    (tmp_path / "shots.png").mkdir()
    (tmp_path / "mine.txt").write_text("a text of my own")
    assert calibration_files(tmp_path) == ([], ["a text of my own"])


@pytest.mark.parametrize("exists", [False, True])
def test_an_output_name_near_the_file_system_s_limit_is_taken(tiny_original, tmp_path, exists):
    """The hidden staging folder's name is the output's plus 18 characters: a valid name of 238
    bytes or more made it too long, refused as 'File name too long; choose a folder you can write to'."""
    dst = tmp_path / ("é" * 120 + "w4")  # 242 bytes
    if exists:
        dst.mkdir()
    quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == [dst.name] and (dst / "config.json").is_file()


@pytest.mark.parametrize("quant, shown", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "(gptq)"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "(fp8)"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "(awq)"),
])  # fmt: skip
def test_a_source_quantized_another_way_is_already_quantized(config_only, tmp_path, monkeypatch, capsys, quant, shown):
    """The loader's refusal ('quantization method 'gptq' is not supported; internvl-chat loads AWQ
    4-bit checkpoints') spoke of chatting with the model, not of quantizing it."""
    raw = json.loads((config_only / "config.json").read_text())
    raw["llm_config"]["quantization_config"] = quant
    (config_only / "config.json").write_text(json.dumps(raw))
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert f"the source checkpoint is already quantized {shown}; quantize a 16-bit checkpoint" in lines[0], lines


def test_a_second_ctrl_c_does_not_cut_the_clean_up_short(tiny_original, tmp_path, monkeypatch):
    """Ctrl-C pressed again while the interrupted run removed its staging folder stopped the removal
    and left part of it (a checkpoint's size) behind."""
    import os
    import signal

    import internvl_chat.quantize.output_folder as output_folder

    remove = shutil.rmtree

    def pressed_again(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled (or ignored) before the next line runs
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(output_folder.shutil, "rmtree", pressed_again)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu", progress=InterruptWhile("writing"))
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_sigterm_after_ctrl_c_does_not_cut_the_clean_up_short(tiny_original, tmp_path, monkeypatch):
    """A `kill` (SIGTERM, as the command handles it) while a Ctrl-C'd run removed its staging folder
    raised in the middle of the removal and left the folder behind; only a second Ctrl-C was ignored."""
    import os
    import signal

    import internvl_chat.quantize.output_folder as output_folder
    from internvl_chat.quantize.command import _end_on_signal

    remove = shutil.rmtree

    def killed_meanwhile(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled (or ignored) before the next line runs
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(output_folder.shutil, "rmtree", killed_meanwhile)
    handler = signal.signal(signal.SIGTERM, _end_on_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu", progress=InterruptWhile("writing"))
        assert signal.getsignal(signal.SIGTERM) is _end_on_signal
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert list(tmp_path.iterdir()) == []


def _with_remote_code(tiny_original: Path, folder: Path) -> Path:
    """The tiny checkpoint laid out as a published original one: an auto_map and its Python files."""
    shutil.copytree(tiny_original, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                          "AutoModel": "modeling_internvl_chat.InternVLChatModel"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_internvl_chat.py").write_text("raise SystemExit('never run by internvl-chat')\n")
    (folder / "modeling_internvl_chat.py").write_text("from .conversation import get_conv_template\n")
    (folder / "conversation.py").write_text("# imported by modeling_internvl_chat.py\n")
    return folder


def test_the_original_layouts_code_files_go_with_its_auto_map(tiny_original, tiny_hf, tmp_path):
    """The output kept the source's auto_map but not the files it names, so InternVL's code and
    lmdeploy's vision loader could not read it; an -hf source's output names no code and gets none."""
    src = _with_remote_code(tiny_original, tmp_path / "src")
    quantize_checkpoint(src, tmp_path / "out", "rtn", group_size=32, device="cpu")
    out = tmp_path / "out"
    assert "auto_map" in json.loads((out / "config.json").read_text())
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py", "conversation.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    (hf / "stray.py").write_text("# not named by any config\n")
    quantize_checkpoint(hf, tmp_path / "out_hf", "rtn", group_size=32, device="cpu")
    assert "auto_map" not in json.loads((tmp_path / "out_hf" / "config.json").read_text())
    assert not list((tmp_path / "out_hf").glob("*.py"))


def test_code_files_beyond_a_checkpoints_are_refused_before_loading(config_only, tmp_path, monkeypatch, capsys):
    raw = json.loads((config_only / "config.json").read_text())  # its code is copied where its config names it
    raw["auto_map"] = {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (config_only / "config.json").write_text(json.dumps(raw))
    (config_only / "modeling_internvl_chat.py").write_bytes(b"#" * 100)
    monkeypatch.setattr("internvl_chat.quantize.checks.MAX_CODE_FILE_BYTES", 99)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1 and "modeling_internvl_chat.py is 100 bytes" in lines[0], lines
    for k in range(3):
        (config_only / f"extra_{k}.py").write_text("")
    monkeypatch.setattr("internvl_chat.quantize.checks.MAX_CODE_FILES", 3)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1 and "holds 4 .py files" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


def test_a_settings_file_beyond_a_checkpoints_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys):
    """Copied whole into the output: a 2 GiB generation_config.json of zeros was, without a word."""
    (config_only / "generation_config.json").write_bytes(b" " * 100)
    monkeypatch.setattr("internvl_chat.quantize.checks.MAX_SETTINGS_FILE_BYTES", 99)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1, lines
    assert "generation_config.json is 100 bytes, larger than a checkpoint's settings file (99 at most)" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "configuration_internvl_chat.py"])
def test_a_copied_source_file_linked_outside_the_checkpoint_is_refused_before_loading(config_only, tmp_path, monkeypatch, capsys, name):
    """The settings and code files are copied into the output as bytes: a link in an untrusted
    checkpoint to a private file (a key, a password store) put that file into an output made to be
    shared."""
    import json

    private = tmp_path / "home" / "secret.txt"
    private.parent.mkdir()
    private.write_text("private")
    config = json.loads((config_only / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}  # code files are copied
    (config_only / "config.json").write_text(json.dumps(config))
    (config_only / name).symlink_to(private)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "out", "--method", "rtn")
    assert code == 2 and len(lines) == 1, lines
    assert f"{config_only / name} is a link to {private}, outside the checkpoint folder" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "no_weights"]


def test_a_hub_cache_snapshots_links_into_its_blobs_are_copied(tiny_original, tmp_path):
    """A Hugging Face cache links each snapshot file to ../../blobs/HASH: those links are the checkpoint's own."""
    from internvl_chat.quantize.checks import check_copied_files

    repo = tmp_path / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for source in tiny_original.iterdir():
        if source.is_file():
            shutil.copy2(source, blobs / f"blob-{source.name}")
            (snapshot / source.name).symlink_to(Path("../../blobs") / f"blob-{source.name}")
    check_copied_files(snapshot)  # no refusal
    # huggingface_hub before 0.23 linked a local-folder download's large files into the cache too
    local = tmp_path / "local-dir"
    local.mkdir()
    (local / "tokenizer.json").symlink_to(blobs / "blob-tokenizer.json")
    check_copied_files(local)


@pytest.mark.parametrize("ending", ["refused", "stopped by SIGTERM", "written"])
def test_the_command_puts_the_signal_handlers_back_when_it_returns(config_only, tiny_original, tmp_path, monkeypatch, capsys, ending):
    """cli.main(["quantize", …]) in-process (tests, a caller's script) left its SIGTERM/SIGHUP handler
    in place: a `kill` long after the run raised EndedBySignal wherever the caller was; and after one
    SIGTERM had stopped a run, both stayed ignored for good."""
    import signal

    import internvl_chat.quantize.pipeline as pipeline

    real = pipeline.write_checkpoint

    def write_then_term(staging, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
        return real(staging, *args, **kwargs)

    if ending == "stopped by SIGTERM":
        monkeypatch.setattr(pipeline, "write_checkpoint", write_then_term)
    src = config_only if ending == "refused" else tiny_original
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code, lines = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--method", "rtn", "--device", "cpu", "--group-size", "32")
        assert {signum: signal.getsignal(signum) for signum in before} == before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert code == {"refused": 2, "stopped by SIGTERM": 143, "written": 0}[ending], lines
    if ending == "stopped by SIGTERM":
        assert lines[-1] == "internvl-chat: stopped by SIGTERM", lines


def test_every_calibration_text_answers_a_sample_before_any_answers_two(tiny_loaded_tokenizer):
    """The folder's texts were drawn at random, with replacement: with as many texts as samples,
    about a third of the user's texts were never used while others answered two or three samples."""
    from collections import Counter

    from internvl_chat.chat.template import PromptBuilder
    from internvl_chat.quantize.calibration import Calibration, calibration_samples

    builder = PromptBuilder(tiny_loaded_tokenizer, None, tokens_per_tile=4)
    mine = [f"Manual page {n}: check the valve." for n in ("one", "two", "three", "four", "five", "six")]
    samples = calibration_samples(builder, tiny_loaded_tokenizer, 12, calib=Calibration([], mine))
    endings = [tiny_loaded_tokenizer.decode(s.ids) for s in samples]
    used = Counter(next(m for m in mine if text.endswith(m)) for text in endings)
    assert used == {m: 2 for m in mine}, used
    first = calibration_samples(builder, tiny_loaded_tokenizer, 3, calib=Calibration([], mine))
    assert [tiny_loaded_tokenizer.decode(s.ids).endswith(m) for s, m in zip(first, mine)] == [True] * 3  # the first by name


def test_a_staging_folder_whose_permissions_cannot_be_set_is_one_line_and_removed(config_only, tmp_path, monkeypatch, capsys):
    """A file system that refuses chmod (a FAT stick whose mount fixes the modes) ended the run with a
    traceback and left the hidden staging folder behind, named by the next run as a killed run's."""
    import internvl_chat.quantize.output_folder as output_folder

    def refused(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(output_folder.os, "chmod", refused)
    code, lines = run_cli(monkeypatch, capsys, config_only, tmp_path / "new" / "out")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f"cannot write the output {tmp_path / 'new' / 'out'} in {tmp_path / 'new'} (Operation not permitted); "
                             "choose a folder you can write to"), lines  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
@pytest.mark.parametrize("exists", [False, True])
def test_every_output_file_is_on_the_disk_before_the_output_appears(tiny_original, tmp_path, monkeypatch, exists):
    """The staging folder was renamed to the output without an fsync: a power cut soon after the run
    said "wrote DST" could leave config.json and all, with weight files empty or cut short."""
    import internvl_chat.quantize.output_folder as output_folder

    dst = tmp_path / "out"
    if exists:
        dst.mkdir()
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_rename(source, target, *args, **kwargs):
        events.append(("rename", os.fspath(target)))
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(output_folder.os, "rename", recording_rename)
    quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu")
    first_rename = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    synced = {Path(path).name for kind, path in events[:first_rename] if kind == "fsync"}
    written = {p.name for p in dst.iterdir()}
    assert written and written <= synced, (written - synced, events)
    assert ("fsync", str(dst if exists else tmp_path)) in events[first_rename:], events  # the rename itself


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
def test_an_output_file_that_cannot_be_synced_is_one_line_and_leaves_nothing(tiny_original, tmp_path, monkeypatch, capsys):
    import errno

    def failing_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--method", "rtn", "--device", "cpu",
                          "--group-size", "32")  # fmt: skip
    assert code == 2
    errors = [line for line in lines if line.startswith("internvl-chat:")]
    assert len(errors) == 1 and "cannot write the output" in errors[0] and "Input/output error" in errors[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_negative_seed_is_refused_it_would_calibrate_as_its_positive_twin():
    """random.Random(-1) is random.Random(1): `--seed -1` made the checkpoint `--seed 1` made, without a word."""
    with pytest.raises(UsageError, match=r"^argument --seed: -1 is negative; give 0 or more"):
        build_parser().parse_args(["src", "dst", "--seed", "-1"])
    assert build_parser().parse_args(["src", "dst", "--seed", "0"]).seed == 0


def test_the_writing_total_counts_every_file_of_a_sharded_output(tiny_original, tmp_path, monkeypatch):
    import internvl_chat.quantize.writer as writer

    monkeypatch.setattr(writer, "SHARD_BYTES", 1 << 17)  # the tiny model's weights in a few shards, with an index
    seen = []

    class Record(Progress):
        def begin(self, name, total, unit):
            seen.append((name, total))

        def update(self, name, done, total, unit, detail):
            seen.append((name, done, total))

    quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu", progress=Record())
    written = len(list((tmp_path / "out").iterdir()))
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    writing = [entry for entry in seen if entry[0] == "writing"]
    assert writing[0] == ("writing", written) and writing[-1] == ("writing", written, written), writing


@pytest.mark.parametrize("exists", [False, True])
def test_ctrl_c_while_the_published_output_is_synced_leaves_nothing(tiny_original, tmp_path, monkeypatch, exists):
    """Syncing the folder after the rename takes a while on a busy disk; a Ctrl-C there said the run
    stopped, and must leave no output, as at any moment before."""
    import internvl_chat.quantize.output_folder as output_folder

    dst = tmp_path / "out"
    if exists:
        dst.mkdir()

    sync = output_folder._sync_folder

    def interrupted(folder):
        if folder in (dst, tmp_path):  # after the rename (or the moves), not the staging folder's own sync before it
            raise KeyboardInterrupt
        sync(folder)

    monkeypatch.setattr(output_folder, "_sync_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_original, dst, "rtn", group_size=32, device="cpu")
    assert list(tmp_path.iterdir()) == ([dst] if exists else []) and (not exists or list(dst.iterdir()) == [])


def test_only_the_calibration_texts_the_samples_use_are_read(tiny_original, tmp_path, monkeypatch):
    """Every .txt file of a --calib folder was read and checked before loading though a run of N
    samples uses the first N by name: a corpus folder of a million texts took hours and gigabytes,
    and a binary file among the unused ones refused the run."""
    import internvl_chat.quantize.calibration as calibration

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        (calib / f"{i}.txt").write_text(f"Text number {i} about gaskets.")
    (calib / "9.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # never used by 4 samples
    read = []
    real = calibration.calibration_text
    monkeypatch.setattr(calibration, "calibration_text", lambda path: read.append(path.name) or real(path))
    quantize_checkpoint(tiny_original, tmp_path / "out", "awq", group_size=32, samples=4, calib_dir=calib, device="cpu")
    assert read == ["0.txt", "1.txt", "2.txt", "3.txt"]


def test_calibration_images_are_the_kinds_the_chat_takes(tiny_original, tmp_path):
    """.gif and .tif images in a --calib folder were passed over without a word where it held a .txt
    file too (the samples used built-in pictures); the chat's /image takes them."""
    from PIL import Image

    from internvl_chat.quantize.calibration import CALIB_IMAGE_SUFFIXES
    from internvl_chat.ui.paths import IMAGE_EXTENSIONS

    assert set(CALIB_IMAGE_SUFFIXES) == IMAGE_EXTENSIONS
    calib = tmp_path / "calib"
    calib.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(calib / "a.gif")
    Image.new("RGB", (64, 96), (30, 200, 30)).save(calib / "b.TIF")
    (calib / "notes.txt").write_text("A red and a green picture.")
    seen = _phases_of_a_run(tiny_original, tmp_path / "out", calib, samples=4)
    assert seen[0] == ("calibration images", 2, "images"), seen


def test_running_out_of_memory_while_quantizing_is_one_line_and_leaves_nothing(tiny_original, tmp_path, monkeypatch, capsys):
    """Memory that ran out in the calibration forward or the searches (a large model on a GPU that
    just holds it) was torch's traceback; now one line with what to change, exit status 1."""
    import internvl_chat.quantize.pipeline as pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "quantize_model", out_of_memory)
    code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--samples", "2", "--device", "cpu",
                          "--group-size", "32")  # fmt: skip
    assert code == 1 and not any("Traceback" in line for line in lines), lines
    assert lines[-1] == "internvl-chat: error: out of memory quantizing on cpu (awq); use fewer --samples (2 now) or a machine with more memory"
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_loading_the_source_gives_quantize_s_advice(tiny_original, tmp_path, monkeypatch, capsys):
    """The loader's advice was the chat's: "use a 4-bit checkpoint or a smaller --max-context" (a
    flag quantize does not have, and a model it cannot quantize)."""
    import internvl_chat.engine.loader as loader

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(loader, "iter_tensors", out_of_memory)
    code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--samples", "2", "--device", "cpu",
                          "--group-size", "32")  # fmt: skip
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("internvl-chat: error: out of memory loading the source on cpu in ") and lines[0].endswith(
        ": quantizing holds the whole 16-bit model; use a machine with more memory"), lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_calibration_text_saved_as_utf16_with_a_byte_order_mark_is_read(tmp_path, encoding):
    """Notepad's "Unicode" (UTF-16 LE with a byte order mark) was refused as binary data: its NUL bytes."""
    from internvl_chat.quantize import calibration_files

    text = "Torque the M8 flange bolts to 25 N·m; 扭矩 25 牛·米."
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}.get(encoding, b"")  # utf-16, utf-32: Python writes one
    (tmp_path / "notes.txt").write_bytes(bom + text.encode(encoding))
    assert calibration_files(tmp_path) == ([], [text])


def test_the_copied_source_files_are_as_readable_as_the_rest_of_the_checkpoint(tiny_original, tmp_path):
    """The tokenizer and settings files were copied with the source's permissions: a private (0600)
    tokenizer.json made an output whose weights others could read and whose tokenizer they could not."""
    import stat

    src = tmp_path / "src"
    shutil.copytree(tiny_original, src)
    for path in src.iterdir():
        path.chmod(0o600)
    old = os.umask(0o022)
    try:
        quantize_checkpoint(src, tmp_path / "out", "rtn", group_size=32, device="cpu")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert "tokenizer.json" in modes and set(modes.values()) == {0o644}, modes


def test_a_file_system_that_cannot_sync_files_still_gets_the_output(tiny_original, tmp_path, monkeypatch):
    import errno

    def unsupported(fd):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "fsync", unsupported)
    quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu")
    assert (tmp_path / "out" / "config.json").is_file()


def test_ctrl_c_while_the_writing_phase_ends_leaves_nothing(tiny_original, tmp_path):
    """The output appeared before the writing phase's last line was shown: a Ctrl-C there said the
    run stopped (exit 130) and left a complete output, which the next run refused as not empty."""

    class InterruptAtTheEnd(Progress):
        def end(self, name, total, unit, seconds):
            if name == "writing":
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_original, tmp_path / "out", "rtn", group_size=32, device="cpu", progress=InterruptAtTheEnd())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spelling", ["same", "through a link"])
def test_the_source_folder_as_the_output_is_named_as_such(config_only, tmp_path, monkeypatch, capsys, spelling):
    dst = config_only
    if spelling == "through a link":
        (tmp_path / "link").symlink_to(config_only)
        dst = tmp_path / "link" / "."
    code, lines = run_cli(monkeypatch, capsys, config_only, dst, "--device", "cpu")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith("is the source folder; give a new output folder (the source is never changed)"), lines
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json"]


@pytest.mark.parametrize("inside", ["w4", "model.safetensors.index.json", "a/b", "through a link"])
def test_an_output_inside_the_source_folder_is_refused(config_only, tmp_path, monkeypatch, capsys, inside):
    """An output folder inside the source was written there: named as a file loading the source
    looks for (`SRC/model.safetensors.index.json`), the source then failed to load ("the shard index
    … is a folder, not a file"); the source is never changed."""
    dst = config_only / inside
    if inside == "through a link":
        (tmp_path / "link").symlink_to(config_only)
        dst = tmp_path / "link" / "w4"
    code, lines = run_cli(monkeypatch, capsys, config_only, dst, "--device", "cpu")
    assert code == 2 and len(lines) == 1, lines
    assert f"the output {dst} is inside the source folder {config_only}; give an output folder outside it" in lines[0], lines
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json"]


def test_an_output_inside_the_source_folder_under_another_name_is_refused(config_only, tmp_path, monkeypatch, capsys):
    """The source folder under a name no link tells (a bind mount; `model` for `Model` on a
    case-insensitive file system: exFAT, an SMB share, macOS): the output was written inside it
    (`mount --bind SRC ALIAS; quantize SRC ALIAS/w4` wrote SRC/w4). Here the alias is a folder that
    os.stat reports as the source, as the kernel does for a bind mount."""
    alias = tmp_path / "alias"
    alias.mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        return real_stat(config_only if os.fspath(path) == str(alias) else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    dst = alias / "w4"
    code, lines = run_cli(monkeypatch, capsys, config_only, dst, "--device", "cpu")
    assert code == 2 and len(lines) == 1, lines
    assert f"the output {dst} is inside the source folder {config_only}; give an output folder outside it" in lines[0], lines
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json"] and not any(alias.iterdir())


def test_an_hf_source_s_python_files_are_not_looked_at(tiny_hf, tmp_path, monkeypatch, capsys):
    """Its .py files are never copied (its output's config names no code), yet an -hf checkpoint
    kept in a folder of scripts was refused for them ("holds 65 .py files"), as was one with a
    script that could not be read."""
    src = tmp_path / "src"
    shutil.copytree(tiny_hf, src)
    for k in range(65):
        (src / f"script_{k}.py").write_text("print('hi')\n")
    os.mkfifo(src / "pipe.py")
    code, lines = run_cli(monkeypatch, capsys, src, tmp_path / "out", "--method", "rtn", "--device", "cpu", "--group-size", "32")
    assert code == 0, lines
    assert not list((tmp_path / "out").glob("*.py"))


def _stuck_rmtree(path, ignore_errors=False, **kwargs):
    """shutil.rmtree on a folder the disk will not let go of (an I/O error, a read-only remount)."""
    if not ignore_errors:
        raise PermissionError(13, "Permission denied", str(path))


@pytest.mark.parametrize("stop, first_line, code", [
    (KeyboardInterrupt, "internvl-chat: interrupted", 130),
    (lambda: EndedBySignal(15), "internvl-chat: stopped by SIGTERM", 143),
])  # fmt: skip
def test_a_stopped_run_whose_partial_output_stays_says_both(tiny_original, tmp_path, monkeypatch, capsys, stop, first_line, code):
    """The staging folder could not be removed after a Ctrl-C: the run said only 'interrupted',
    and a hidden folder of a checkpoint's size stayed without a word."""
    import internvl_chat.quantize.output_folder as output_folder
    from internvl_chat.quantize import pipeline

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(pipeline, "sync_staged", stopped)
    monkeypatch.setattr(output_folder.shutil, "rmtree", _stuck_rmtree)
    exit_code, lines = run_cli(monkeypatch, capsys, tiny_original, tmp_path / "out", "--method", "rtn", "--device", "cpu")
    (left,) = [p for p in tmp_path.iterdir()]
    assert exit_code == code
    assert lines[-2:] == [first_line, f"internvl-chat: error: could not remove the partial output {left}, "
                                      "left by this run (Permission denied); delete it yourself"]


def test_a_ctrl_c_whose_output_cannot_be_taken_back_says_both(tiny_original, tmp_path, monkeypatch, capsys):
    """A Ctrl-C as the renamed output was synced, and the rename could not be taken back: that
    rename's error replaced the interrupt ("cannot create the output"), though the output was there, whole."""
    import internvl_chat.quantize.output_folder as output_folder

    dst = tmp_path / "out"
    rename = os.rename

    def interrupted(folder):
        raise KeyboardInterrupt

    def no_way_back(source, target):
        if Path(source) == dst:
            raise PermissionError(13, "Permission denied", str(source))
        return rename(source, target)

    monkeypatch.setattr(output_folder, "_sync_folder", interrupted)
    monkeypatch.setattr(output_folder.os, "rename", no_way_back)
    exit_code, lines = run_cli(monkeypatch, capsys, tiny_original, dst, "--method", "rtn", "--device", "cpu")
    assert exit_code == 130 and (dst / "config.json").is_file()
    assert lines[-2:] == ["internvl-chat: interrupted", f"internvl-chat: error: the output {dst} was already written "
                          "whole and stays: it could not be taken back (Permission denied); delete it if you do not want it"]


def test_a_ctrl_c_whose_moved_files_cannot_be_taken_back_says_both(tiny_original, tmp_path, monkeypatch, capsys):
    """Staged inside an existing empty output, a Ctrl-C while the files were moved up, and they could
    not be taken back out: the unlink's error replaced the interrupt, and did not say files stayed."""
    dst = tmp_path / "out"
    dst.mkdir()
    unlink = Path.unlink

    def stuck(self, *args, **kwargs):
        if self.exists():
            raise PermissionError(13, "Permission denied", str(self))
        return unlink(self, *args, **kwargs)

    interrupt_the_second_rename(monkeypatch)
    monkeypatch.setattr(Path, "unlink", stuck)
    exit_code, lines = run_cli(monkeypatch, capsys, tiny_original, dst, "--method", "rtn", "--device", "cpu")
    monkeypatch.undo()
    assert exit_code == 130
    assert lines[-2:] == ["internvl-chat: interrupted", f"internvl-chat: error: 1 file moved into the output {dst} could "
                          "not be taken back out (Permission denied); delete the files in it yourself"]


def test_a_ctrl_c_once_the_output_is_written_says_it_stays(tiny_original, tmp_path, monkeypatch, capsys):
    """A Ctrl-C as the finished bars were drawn for the last time (the user saw 'writing 6/6'):
    the run said only 'interrupted', as if it had left nothing, and the whole output was there."""
    from internvl_chat.quantize import command

    class StoppedAtTheEnd(command.BarProgress):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            raise KeyboardInterrupt

    monkeypatch.setenv("FORCE_COLOR", "1")  # the bars, as on a terminal
    monkeypatch.setattr(command, "BarProgress", StoppedAtTheEnd)
    dst = tmp_path / "out"
    exit_code, lines = run_cli(monkeypatch, capsys, tiny_original, dst, "--method", "rtn", "--device", "cpu")
    assert exit_code == 130 and (dst / "config.json").is_file()
    assert lines[-2].endswith("internvl-chat: interrupted")  # after the bars' show-cursor sequence
    assert lines[-1] == f"internvl-chat: the output {dst} was already written whole and stays; delete it if you do not want it"
