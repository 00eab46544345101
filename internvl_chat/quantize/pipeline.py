"""`quantize_checkpoint`, a whole run in order: the flags and the source checked, the output folder
claimed, calibration inputs read, the model loaded and checked, quantized, and written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..chat.template import PromptBuilder
from ..engine.config import refuse_web_model
from ..engine.loader import OutOfMemoryLoading, load_model, resolve_device
from ..engine.out_of_memory import is_out_of_memory
from ..errors import InternVLChatError, UsageError
from ..files import expand_home, is_web_address, real_path, refuse_web_address, visible
from .blocks import quantize_model
from .calibration import MAX_SAMPLES, Calibration, Sample, calibration_files, calibration_samples, calibration_tiles
from .checks import check_group_size, check_source, check_source_values, check_written_range
from .output_folder import publish, staged_output, sync_staged
from .progress import Progress
from .writer import float_tensors, head_is_tied, original_config, output_file_count, write_checkpoint, write_error


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: str = "awq",
    group_size: int | None = None,
    samples: int = 32,
    calib_dir: str | Path | None = None,
    device: str = "auto",
    clip: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Quantize `src` into the new folder `dst`. Everything that can be checked without the weights
    (flags, group size against config.json, the output folder) is checked before loading them."""
    progress = progress or Progress()
    refuse_web_model(src, "the source", "give a 16-bit checkpoint folder")
    _refuse_web_folders(dst, calib_dir)
    src, dst = expand_home(src), Path(os.path.abspath(expand_home(dst)))
    if method not in ("awq", "rtn"):
        raise UsageError(f"unknown method {method!r}; use awq or rtn")
    if calib_dir and method == "rtn":  # ignored, a user would believe their data was used
        raise UsageError("--calib is for --method awq: RTN uses no calibration data; drop --calib or use --method awq")
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    if samples > MAX_SAMPLES:
        raise UsageError(f"--samples {samples} is too many: every sample is held in memory; use at most {MAX_SAMPLES} (32 is the default)")
    cfg = check_source(src)
    if _same_folder(src, dst):  # was "exists and is not empty", as if it were someone else's
        raise UsageError(f"the output {visible(str(dst))} is the source folder; give a new output folder (the source is never changed)")
    if _inside_folder(src, dst):  # SRC/model.safetensors.index.json, a folder there, and SRC no longer loaded
        raise UsageError(f"the output {visible(str(dst))} is inside the source folder {visible(str(src))}; give an output "
                         "folder outside it (the source is never changed: a folder written there may stand where loading "
                         "the source looks for a file)")  # fmt: skip
    group_size = check_group_size(cfg, group_size)
    resolve_device(device)
    calib_images, calib_texts = [], []
    if calib_dir:
        calib_images, calib_texts = calibration_files(expand_home(calib_dir), max_texts=samples)
        calib_images = calib_images[: (samples + 1) // 2]  # the ones the samples use (every other one has an image)
    with staged_output(dst) as staging:
        calib = None
        if calib_dir:
            tiles = []
            if calib_images:
                with progress.phase("calibration images", len(calib_images), "images") as step:
                    tiles = calibration_tiles(calib_images, step=step)
            calib = Calibration(tiles, calib_texts)
        with progress.phase("loading", 1, "model") as step:
            # the app's default dtype (cpu_features: bf16 for a large decoder on CPU too, its products in
            # fp32 over upcast weights where bf16 is emulated), bf16 on CUDA
            # a calibration sample is at most ~1.3k tokens; the cache may not exceed the model's positions
            context = min(4096, cfg.text.max_position_embeddings)
            try:
                loaded = load_model(src, device=device, dtype="auto", max_context=context, cuda_graphs=False)
            except OutOfMemoryLoading as e:  # its advice was the chat's: a 4-bit checkpoint, --max-context
                where = "" if e.device.type == "cpu" else "--device cpu or "
                raise InternVLChatError(f"out of memory loading the source on {e.device} in {str(e.dtype).removeprefix('torch.')}: "
                                        f"quantizing holds the whole 16-bit model; use {where}a machine with more memory") from None  # fmt: skip
            check_source_values(loaded)
            step()
        data: list[Sample] = []
        with _out_of_memory_as_error(method, samples, loaded.model.device):
            if method == "awq":
                builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
                with progress.phase("calibration data", samples, "samples") as step:
                    data = calibration_samples(builder, loaded.tokenizer, samples, seed, calib, step=step)
            packed = quantize_model(loaded, data, method, group_size, clip, progress)
            tensors = {**float_tensors(loaded), **packed}
        check_written_range(tensors, method)
        config = original_config(src, loaded.config, group_size, head_is_tied(loaded))
        with progress.phase("writing", output_file_count(config, tensors, src), "files") as step:
            try:
                write_checkpoint(staging, config, tensors, src, step)
                sync_staged(staging)
            except OSError as e:
                raise write_error(e, src, dst) from None
        # the last step, after the phase's last line: an interrupt while that line was shown (a
        # terminal's bar redrawn) came after the output appeared, and the run said it was stopped
        publish(staging, dst)
    return dst


def _same_folder(src: Path, dst: Path) -> bool:
    try:
        return os.path.samefile(src, dst)
    except OSError:  # no output folder yet, or a broken link there (staging_folder names it)
        return False


def _inside_folder(src: Path, dst: Path) -> bool:
    """Whether `dst` lies inside the folder `src` (links followed, as far as they exist yet), also
    where a folder above it is `src` under another name that no link tells (the same folder by its
    device and inode: a case-insensitive file system's `model` for `Model` (exFAT, an SMB share,
    macOS), a bind mount), as `_same_folder` tells `dst` itself."""
    inner, outer = real_path(dst), real_path(src)
    if inner != outer and inner.is_relative_to(outer):
        return True
    for folder in inner.parents:
        try:
            if os.path.samefile(folder, src):
                return True
        except OSError:  # not there (yet), or not to be looked into
            continue
    return False


def _refuse_web_folders(dst: str | Path, calib_dir: str | Path | None) -> None:
    """A UsageError for the output or --calib folder typed as a web address, named as typed: as a
    Path it lost a slash, and the output was written to a local folder `https:/host/…`."""
    if is_web_address(dst):
        raise UsageError(f"the output folder {visible(os.fspath(dst))} is a web address; give a local folder to write to")
    if calib_dir:
        refuse_web_address(calib_dir, "--calib ", "download them and give their folder")


@contextmanager
def _out_of_memory_as_error(method: str, samples: int, device: torch.device) -> Iterator[None]:
    """Running out of memory once the model is loaded (the calibration samples' activations, the
    searches, the packed copy) as one line saying what to change, not torch's traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        fixes = [f"fewer --samples ({samples} now)"] if method == "awq" and samples > 1 else []
        fixes += ["--device cpu"] if device.type != "cpu" else []
        fixes.append("a machine with more memory")
        advice = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
        raise InternVLChatError(f"out of memory quantizing on {device} ({method}); use {advice}") from None
