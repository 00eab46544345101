"""internvl-chat benchmark (`make bench`): engine vs transformers, chunk prefilling, W4 vs 16-bit.

CPU (default), on a small-but-not-trivial random-weight model built here:
  engine    prefill / TTFT / decode tokens/s of our engine vs transformers' generate() (same weights,
            prompt and dtype), as ratios measured in one run (issue 2)
  overhead  the same on a tiny model, where per-token framework overhead dominates
  load      load time and peak resident memory while loading vs the weights' size (fresh process)
  chunk     TTFT of turns 2..N of a conversation with a 13-tile image in turn 1: chunk prefilling
            (Session) vs re-prefilling the whole history each turn (issue 3)
  w4        decode tokens/s and resident weight memory of W4 (RTN, torch int4 kernel and dequant
            backends) vs bf16 and fp32 (issue 4)
  decode    prefill and decode tokens/s, ours eager and compiled (engine/compiled.py) vs llama.cpp
            on the same weights: demo model and the Qwen2.5-0.5B shape, fp32/bf16, 1 and 2 threads;
            aten calls per decode layer eager vs compiled (issue 10)
  startup   seconds from starting `internvl-chat` (demo model, in a pseudo-terminal) to its first
            prompt, next to `python -c "import torch"` in the same run (issue 9: target ≤ 1.5×)
--device cuda adds, with random weights built on the GPU:
  shapes    InternVL3-8B/-1B/-2B: W4 (tinygemm; triton, gemlite where available) and bf16 decode
            tokens/s (eager, CUDA graphs, compiled in the graphs), share of the copy bandwidth
            measured in the same call, kernels per layer,
            13-tile TTFT, follow-up TTFT after 1k/4k tokens of history, peak memory
            (CPU dry run: `--quick --sections shapes`)
  gemv      every int4 linear backend available (tinygemm kernel and dense path, triton, ...) and
            bf16 on each decoder linear of the 8B/1B/2B LLMs by rows M = 1…512: µs, GB/s, share of the
            copy bandwidth, output check, the fastest backend per (shape, M); dense_threshold
            (`crossover`, its former name, runs it too; CPU dry run: `--quick --sections gemv`)
  gemv-sweep  (only when --sections names it) the triton GEMV's launch configuration tuned: on the
            four 8B decoder linears at M = 1 (--sweep-rows), the default (BLOCK_N, BLOCK_K,
            NUM_WARPS, TARGET_PROGRAMS) and ~15 others: µs, share of the copy bandwidth, output
            check, the best per shape vs the default and tinygemm (--sweep-budget, default 100 s;
            CPU dry run: TRITON_INTERPRET=1 ... --device cpu --quick --sections gemv-sweep)
  dequant-sweep  (only when --sections names it) the one-pass dequantization kernels' launch
            configuration tuned (quant/triton_dequant.py: tinygemm and repacked layouts): on the
            four 8B decoder linears, the default (BLOCK_N, BLOCK_W, NUM_WARPS) and ~14 others: µs,
            GB/s, share of the copy bandwidth, output bit for bit against the default's, the best
            per shape and over all shapes vs the default (--dqsweep-budget, default 60 s; CPU dry
            run: TRITON_INTERPRET=1 ... --device cpu --quick --sections dequant-sweep)

    python scripts/bench.py [--device cpu|cuda] [--quick] [--out FILE.json] [--sections a,b]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as bl  # noqa: E402
from script_args import positive_int, positive_ints, seconds, torch_device  # noqa: E402

from internvl_chat.chat.sampling import SamplingParams  # noqa: E402
from internvl_chat.chat.session import Session  # noqa: E402
from internvl_chat.chat.template import MediaSpec, PromptBuilder  # noqa: E402
from internvl_chat.engine.loader import load_model  # noqa: E402
from internvl_chat.media.image import load_image  # noqa: E402

QUESTION = "Describe this image in detail."
STORY = "Tell me a long story about a small robot who wants to learn how to paint the sea."
FOLLOW_UPS = [
    "Describe the picture.",
    "Which colours dominate?",
    "Is there any text in it?",
    "How many objects can you count?",
    "Summarise everything in one line.",
    "Anything else?",
]
CPU_SECTIONS = ("engine", "overhead", "load", "chunk", "w4", "decode", "startup")
CUDA_SECTIONS = ("shapes", "gemv", "engine", "load", "chunk")
OPT_IN_SECTIONS = ("gemv-sweep", "dequant-sweep")  # run only when --sections names them (tuning, not a default measurement)
SECTION_ALIASES = {"crossover": "gemv"}  # the gemv section grew out of tinygemm-vs-dense "crossover"


def quiet_transformers() -> None:
    """No progress bars or generation-config chatter in the benchmark's output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ms(seconds: float) -> float:
    return seconds * 1e3


# ---------------------------------------------------------------------------------------------
# Issue 2: engine vs transformers


def section_engine(ckpt: Path, image: Path, plan: bl.Plan, device: torch.device, dtype: torch.dtype) -> dict:
    loaded = load_model(ckpt, device=device, dtype=dtype, max_context=plan.max_context)
    model = loaded.model
    pixels = load_image(image).pixel_values
    tiles = pixels.shape[0]
    builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
    prompt = builder.first_turn(QUESTION, [MediaSpec("image", tiles)])
    stops = list(builder.stop_ids)
    hf = bl.load_transformers(ckpt, device, dtype)
    n = plan.decode_tokens

    _, features = bl.time_vision(model, pixels)  # warm-up, both engines
    bl.engine_greedy(model, prompt, features, 2, stops)
    bl.transformers_greedy(hf, prompt, pixels, 2, stops)
    ours, theirs = [], []
    for _ in range(plan.repeats):  # interleaved, so drift hits both alike
        vision_s, features = bl.time_vision(model, pixels)
        ours.append({**bl.engine_greedy(model, prompt, features, n, stops), "vision_s": vision_s})
        theirs.append({**bl.transformers_greedy(hf, prompt, pixels, n, stops), "vision_s": bl.transformers_vision(hf, pixels)})

    def summary(runs: list[dict], engine: bool) -> dict:
        vision = bl.median([r["vision_s"] for r in runs])
        if engine:
            prefill = bl.median([r["prefill_s"] for r in runs])
            ttft = bl.median([r["vision_s"] + r["prefill_s"] for r in runs])
        else:  # generate() runs vision + prefill as one call: prefill = TTFT − separately timed vision
            ttft = bl.median([r["ttft_s"] for r in runs])
            prefill = ttft - vision
        return {
            "vision_ms": _ms(vision),
            "prefill_ms": _ms(prefill),
            "ttft_ms": _ms(ttft),
            "decode_tokens_per_s": bl.median([r["decode_tokens"] / r["decode_s"] for r in runs]),
            "decode_runs_tokens_per_s": [r["decode_tokens"] / r["decode_s"] for r in runs],
        }

    o, t = summary(ours, True), summary(theirs, False)
    same = 0
    for a, b in zip(ours[-1]["tokens"], theirs[-1]["tokens"]):
        if a != b:
            break
        same += 1
    out = {
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": len(prompt),
        "image_tiles": tiles,
        "decode_tokens": n,
        "repeats": plan.repeats,
        "transformers_attention": getattr(hf.config, "_attn_implementation", None),
        "ours": o,
        "transformers": t,
        "decode_speedup": bl.ratio(o["decode_tokens_per_s"], t["decode_tokens_per_s"]),
        "ttft_speedup": bl.ratio(t["ttft_ms"], o["ttft_ms"]),
        "prefill_speedup": bl.ratio(t["prefill_ms"], o["prefill_ms"]),
        "vision_speedup": bl.ratio(t["vision_ms"], o["vision_ms"]),
        "greedy_tokens_agree": f"{same}/{n}",
        "target_decode_speedup": 2.0,
    }
    del hf, loaded, model
    _free(device)
    return out


def section_load(ckpt: Path, plan: bl.Plan, device: torch.device, dtype: torch.dtype) -> dict:
    name = str(dtype).removeprefix("torch.")
    context = min(plan.max_context, 1024)
    out = bl.run_load_probe(ckpt, str(device), name, context, warm=True)
    cold = bl.run_load_probe(ckpt, str(device), name, context, warm=False)
    keys = ("load_s", "peak_rss_delta_bytes", "peak_rss_over_weights", "peak_rss_anon_over_weights", "peak_gpu_over_weights")
    out["cold_process"] = {k: cold[k] for k in keys if k in cold}
    if device.type == "cpu" and dtype != torch.bfloat16:
        # the checkpoint is bf16: loading into bf16 maps as many file bytes as it allocates
        bf16 = bl.run_load_probe(ckpt, "cpu", "bfloat16", context, warm=True)
        out["bf16_target"] = {k: bf16[k] for k in keys + ("weights_bytes", "peak_rss_anon_delta_bytes", "peak_rss_file_delta_bytes") if k in bf16}
    out["target_peak_over_weights"] = 1.3
    return out


# ---------------------------------------------------------------------------------------------
# Issue 3: chunk prefilling vs re-prefilling the whole conversation


@torch.inference_mode()
def _timed_first_token(model, ids: list[int], start_pos: int, features) -> tuple[float, int]:
    bl.sync(model.device)
    t0 = time.perf_counter()
    token = int(model.forward(ids, start_pos, features).argmax())  # .item() syncs
    return time.perf_counter() - t0, token


def _drain(events) -> dict:
    final = None
    for event in events:
        final = event
    return final


def section_chunk(ckpt: Path, image: Path, plan: bl.Plan, device: torch.device, dtype: torch.dtype) -> dict:
    loaded = load_model(ckpt, device=device, dtype=dtype, max_context=plan.max_context)
    model = loaded.model
    session = Session(loaded, SamplingParams(max_new_tokens=plan.answer_tokens))
    media = session.describe_image(image)
    first = _drain(session.ask(FOLLOW_UPS[0], [media]))["timing"]
    features = session.turns[0].features
    vision_s = first["vision_s"]
    turns = []
    for k in range(2, plan.chat_turns + 1):
        question = FOLLOW_UPS[(k - 1) % len(FOLLOW_UPS)]
        new_ids = session.builder.next_turn(question, [])
        history = session.ids + new_ids  # the whole conversation, as the original demo re-prefills it
        chunk = session.ids[session.start_pos :] + new_ids  # what Session prefills
        full_s, full_tok = _timed_first_token(model, history, 0, features)
        chunk_s, chunk_tok = _timed_first_token(model, chunk, session.start_pos, None)
        timing = _drain(session.ask(question))["timing"]
        turns.append({
            "turn": k,
            "history_tokens": len(history),
            "chunk_tokens": len(chunk),
            "reprefill_ttft_ms": _ms(full_s),
            "reprefill_with_vision_ttft_ms": _ms(full_s + vision_s),
            "chunk_ttft_ms": _ms(chunk_s),
            "session_ttft_ms": _ms(timing["ttft_s"]),
            "speedup": bl.ratio(full_s, chunk_s),
            "same_first_token": full_tok == chunk_tok,
        })  # fmt: skip
    out = {
        "dtype": str(dtype).removeprefix("torch."),
        "image_tiles": media.tiles,
        "turn1": {
            "prompt_tokens": first["prefill_tokens"],
            "vision_ms": _ms(vision_s),
            "prefill_ms": _ms(first["prefill_s"]),
            "ttft_ms": _ms(first["ttft_s"]),
        },
        "turns": turns,
        "median_speedup": bl.median([t["speedup"] for t in turns]),
        "median_speedup_vs_reprefill_with_vision": bl.median(
            [t["reprefill_with_vision_ttft_ms"] / t["chunk_ttft_ms"] for t in turns]
        ),
        "total_reprefill_ms": sum(t["reprefill_ttft_ms"] for t in turns),
        "total_chunk_ms": sum(t["chunk_ttft_ms"] for t in turns),
        "note": "TTFT = prefill forward + argmax of the first token, timed identically for both; "
        "session_ttft_ms is Session's own timing (on CPU it also includes the first decode step).",
    }
    del session, loaded, model
    _free(device)
    return out


# ---------------------------------------------------------------------------------------------
# Issue 4: W4 vs 16-bit on CPU


def section_w4(ckpt: Path, plan: bl.Plan) -> dict:
    device = torch.device("cpu")
    variants = [
        ("fp32", torch.float32, None),
        ("bf16", torch.bfloat16, None),
        ("w4-torch", torch.bfloat16, "torch"),
        ("w4-dequant", torch.bfloat16, "dequant"),
    ]
    rows: dict[str, dict] = {}
    reference = None
    for name, dtype, backend in variants:
        loaded = load_model(ckpt, device=device, dtype=dtype, max_context=512)
        model = loaded.model
        builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
        prompt = builder.first_turn(STORY)
        stops = list(builder.stop_ids)
        replaced = bl.quantize_decoder_(model, backend) if backend else 0
        with torch.inference_mode():
            logits = model.forward(prompt, 0).float()
        if reference is None:
            reference = logits
        bl.engine_greedy(model, prompt, None, 2, stops)  # warm-up
        runs = [bl.engine_greedy(model, prompt, None, plan.decode_tokens, stops) for _ in range(plan.repeats)]
        linears = bl.decoder_linears(model)
        rows[name] = {
            "activations": str(dtype).removeprefix("torch."),
            "int4_backend": backend,
            "replaced_linears": replaced,
            "decode_tokens_per_s": bl.median([r["decode_tokens"] / r["decode_s"] for r in runs]),
            "prefill_ms": _ms(bl.median([r["prefill_s"] for r in runs])),
            "weights_bytes": model.memory_bytes(),
            "decoder_linear_bytes": sum(bl.module_bytes(m) for _, _, m in linears),
            "logits_cosine_vs_fp32": float(torch.nn.functional.cosine_similarity(logits, reference, dim=0)),
        }
        del loaded, model
        _free(device)
    base = rows["bf16"]
    for name in ("w4-torch", "w4-dequant"):
        rows[name]["decode_speedup_vs_bf16"] = bl.ratio(rows[name]["decode_tokens_per_s"], base["decode_tokens_per_s"])
        rows[name]["memory_ratio_vs_bf16"] = bl.ratio(rows[name]["weights_bytes"], base["weights_bytes"])
        rows[name]["decoder_memory_ratio_vs_bf16"] = bl.ratio(rows[name]["decoder_linear_bytes"], base["decoder_linear_bytes"])
    return {
        "prompt": "text only",
        "decode_tokens": plan.decode_tokens,
        "quantization": f"RTN, group {bl.AWQ_GROUP}, decoder linears only",
        "variants": rows,
    }


# ---------------------------------------------------------------------------------------------
# Issue 10: CPU decode and prefill, eager and compiled, side by side with llama.cpp

DECODE_MODEL_NAMES = {"demo": "demo model (real weights)", "qwen0.5b": "Qwen2.5-0.5B shape (InternVL3-1B LLM), random"}


DEMO_DECODE_REPEAT_FACTOR = 5


def section_decode(plan: bl.Plan, work_dir: Path, start: float) -> dict:
    """Each (model, dtype, threads) in a fresh process (ours: prefill, eager decode, compile, compiled
    decode); llama-bench on the same weights converted to GGUF when llama.cpp is built. The 0.5B
    checkpoint (~1 GB) and the GGUF files are kept in `work_dir` (make bench: .cache/bench-decode)."""
    tool = bl.llama_cpp_tool() if plan.llama_cpp else None
    bin_dir = bl.llama_cpp_bin(tool)
    out: dict = {"prefill_tokens": plan.decode_prefill, "decode_tokens": plan.decode_new, "repeats": plan.decode_repeats,
                 "llama_cpp_bin": str(bin_dir) if bin_dir else None, "rows": []}  # fmt: skip
    if plan.llama_cpp and bin_dir is None:
        out["llama_cpp_missing"] = "llama.cpp is not built (../shared/tools/llama-cpp build); its rows are left out"
    for name in plan.decode_models:
        model_dir = bl.DEMO_MODEL if name == "demo" else bl.build_shape_checkpoint(work_dir / "qwen0.5b")
        for dtype in plan.decode_dtypes:
            gguf = None
            if bin_dir is not None:
                try:
                    kind = "f32" if dtype == "float32" else "bf16"
                    gguf = bl.convert_gguf(tool, model_dir, work_dir / f"gguf-{name}-{kind}", kind)
                except Exception as e:
                    out.setdefault("errors", []).append(f"{name} {dtype}: {e!r}")
            # the demo's runs last ~10 ms each: more of them, for a median that rides out this
            # shared machine's hiccups (both engines alike)
            repeats = plan.decode_repeats * (DEMO_DECODE_REPEAT_FACTOR if name == "demo" else 1)
            depth = plan.decode_depth(name, dtype)
            for threads in plan.decode_threads:
                row: dict = {"model": name, "dtype": dtype, "threads": threads, "repeats": repeats}
                bl.log(f"  {name} {dtype} {threads} thread(s) ...", start)
                try:
                    row["ours"] = bl.run_decode_probe(model_dir, dtype, threads, plan.decode_prefill, plan.decode_new,
                                                      repeats, depth=depth)  # fmt: skip
                except Exception as e:
                    row["ours_error"] = repr(e)
                if gguf is not None:
                    try:
                        row["llama_cpp"] = bl.llama_bench(bin_dir, gguf, threads, plan.decode_prefill, plan.decode_new,
                                                          repeats)  # fmt: skip
                        if depth:
                            row["llama_cpp_depth"] = bl.llama_bench(bin_dir, gguf, threads, 0, plan.decode_new, repeats, depth)
                    except Exception as e:
                        row["llama_cpp_error"] = repr(e)
                ours, theirs = row.get("ours", {}), row.get("llama_cpp", {})
                best = max(ours.get("eager_tokens_per_s", 0), ours.get("compiled_tokens_per_s", 0))
                if theirs.get("decode_tokens_per_s"):
                    row["decode_vs_llama_cpp"] = best / theirs["decode_tokens_per_s"]
                deep = row.get("llama_cpp_depth", {}).get("decode_tokens_per_s")
                if deep and ours.get("depth_compiled_tokens_per_s"):
                    row["depth_decode_vs_llama_cpp"] = ours["depth_compiled_tokens_per_s"] / deep
                if theirs.get("prefill_tokens_per_s") and ours.get("prefill_tokens_per_s"):
                    row["prefill_vs_llama_cpp"] = ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"]
                out["rows"].append(row)
    return out


def render_decode(d: dict) -> list[str]:
    lines = ["", f"[CPU decode and prefill vs llama.cpp] tokens/s, median of {d['repeats']} (demo: "
                 f"{d['repeats'] * DEMO_DECODE_REPEAT_FACTOR}); prefill {d['prefill_tokens']} tokens, decode "
                 f"{d['decode_tokens']} new tokens from a fresh context (ours: after 2 tokens); ours compiled = engine/compiled.py",
             f"  {'model':10}{'dtype':10}{'thr':>4}{'prefill':>9}{'llama':>8}{'decode eager':>14}{'compiled':>10}{'llama':>8}"
             f"{'best/llama':>11}{'GB/s':>7}{'compile s':>10}{'ops/layer e/c':>14}"]  # fmt: skip
    for r in d["rows"]:
        o, t = r.get("ours", {}), r.get("llama_cpp", {})
        best = max(o.get("eager_tokens_per_s", 0), o.get("compiled_tokens_per_s", 0))
        gbs = best * o["bytes_per_token"] / 1e9 if o.get("bytes_per_token") else None
        lines.append(
            f"  {r['model']:10}{r['dtype']:10}{r['threads']:>4}{_fmt(o.get('prefill_tokens_per_s')):>9}"
            f"{_fmt(t.get('prefill_tokens_per_s')):>8}{_fmt(o.get('eager_tokens_per_s')):>14}"
            f"{_fmt(o.get('compiled_tokens_per_s')):>10}{_fmt(t.get('decode_tokens_per_s')):>8}"
            f"{_fmt(r.get('decode_vs_llama_cpp'), '.2f'):>11}{_fmt(gbs):>7}{_fmt(o.get('compile_s')):>10}"
            f"{_fmt(o.get('eager_ops_per_layer'), '.0f') + '/' + _fmt(o.get('compiled_ops_per_layer'), '.0f'):>14}"
        )
        for key in ("ours_error", "llama_cpp_error"):
            if key in r:
                lines.append(f"    {key}: {r[key][:300]}")
        if o.get("compile_error"):
            lines.append(f"    compile: {o['compile_error']}")
    deep = [r for r in d["rows"] if r.get("ours", {}).get("depth")]
    if deep:
        lines += ["", "  decode after a long context (llama-bench -d, the better of -fa 0/1), ours compiled, tokens/s:",
                  f"  {'model':10}{'dtype':10}{'thr':>4}{'context':>9}{'ours':>10}{'llama':>8}{'ours/llama':>11}"]  # fmt: skip
        for r in deep:
            lines.append(
                f"  {r['model']:10}{r['dtype']:10}{r['threads']:>4}{r['ours']['depth']:>9}"
                f"{_fmt(r['ours'].get('depth_compiled_tokens_per_s')):>10}"
                f"{_fmt(r.get('llama_cpp_depth', {}).get('decode_tokens_per_s')):>8}"
                f"{_fmt(r.get('depth_decode_vs_llama_cpp'), '.2f'):>11}"
            )
    if d.get("llama_cpp_missing"):
        lines.append(f"  {d['llama_cpp_missing']}")
    for err in d.get("errors", []):
        lines.append(f"  {err[:300]}")
    return lines


# ---------------------------------------------------------------------------------------------
# --device cuda: InternVL3 shapes with random weights


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def measure_shape(cfg, plan: bl.Plan, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                  bandwidth: float | None = None, compiled: bool | None = None, backend: str = "auto") -> dict:  # fmt: skip
    """Build one random-weight model on `device` (a W4 config's linears with int4 `backend`); time
    the first turn with a 13-tile image (vision + prefill + first token), follow-up turns after
    1k/4k tokens of history, and batch-1 decode: eager, CUDA graphs, and compiled inside the
    graphs (CPU: eager and compiled)."""
    is_cuda = device.type == "cuda"
    if is_cuda:
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    tiles = plan.cuda_image_tiles
    image_tokens = tiles * cfg.tokens_per_tile
    p, n = plan.cuda_prefill_tokens, plan.cuda_decode_tokens
    history = max(plan.cuda_followup_history, default=0)
    long = plan.cuda_long_context if is_cuda else 0
    max_seq = _round_up(max(image_tokens + 64, p + n + 64, history + plan.cuda_followup_tokens + 64, long + n + 64), 256)
    t0 = time.perf_counter()
    model = bl.build_random_model(cfg, device, dtype, max_seq, backend)
    bl.sync(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator(device=device).manual_seed(1)
    img = model.image_token_id

    def text(k: int) -> torch.Tensor:
        return torch.randint(0, min(img, 151643), (k,), device=device, generator=gen)

    ids = torch.cat([text(24), torch.full((image_tokens,), img, device=device), text(16)])
    pixels = torch.randn(tiles, 3, cfg.image_size, cfg.image_size, device=device, generator=gen)
    out: dict = {"build_s": build_s, "weights_bytes": model.memory_bytes(), "kv_cache_bytes": model.language_model.cache_bytes()}
    reps = max(1, min(2, plan.cuda_repeats))

    # first turn: vision (13 tiles) + prefill of the image prompt + the first token
    _, features = bl.time_vision(model, pixels)
    _timed_first_token(model, ids.tolist(), 0, features)  # warm-up
    vision = [bl.time_vision(model, pixels)[0] for _ in range(reps)]
    prefill = [_timed_first_token(model, ids.tolist(), 0, features)[0] for _ in range(reps)]
    out["prefill"] = {
        "image_tiles": tiles,
        "tokens": int(ids.numel()),
        "vision_ms": _ms(bl.median(vision)),
        "llm_prefill_ms": _ms(bl.median(prefill)),
        "llm_prefill_tokens_per_s": ids.numel() / bl.median(prefill),
        "ttft_ms": _ms(bl.median(vision) + bl.median(prefill)),
    }
    del features

    # a follow-up turn after h cached tokens: prefill only the new tokens, then the first token;
    # eager, and on CUDA replayed from a captured prefill graph too (as the app runs by default)
    follow, follow_graphs = {}, {}
    for h in plan.cuda_followup_history:
        past, turn = text(h).tolist(), text(plan.cuda_followup_tokens).tolist()
        with torch.inference_mode():
            model.forward(past, 0)
        _timed_first_token(model, turn, h, None)  # warm-up
        follow[str(h)] = _ms(bl.median([_timed_first_token(model, turn, h, None)[0] for _ in range(max(2, reps))]))
        if is_cuda:
            try:
                model.enable_cuda_graphs(True)
                _timed_first_token(model, turn, h, None)  # captures the graph
                if model.decode_graphs.prefill_failure is not None:
                    raise RuntimeError(model.decode_graphs.prefill_failure)
                follow_graphs[str(h)] = _ms(bl.median([_timed_first_token(model, turn, h, None)[0] for _ in range(max(2, reps))]))
            except Exception as e:
                out["followup_graphs_error"] = repr(e)[:500]
            finally:
                model.enable_cuda_graphs(False)
    out["followup_ttft_ms"] = follow
    if follow_graphs:
        out["followup_ttft_ms_graphs"] = follow_graphs
    out["followup_tokens"] = plan.cuda_followup_tokens
    if plan.cuda_followup_history:  # the last turn's kernels: their time against its wall time says
        # whether the GPU or the host (launches) sets a follow-up's pace
        h = plan.cuda_followup_history[-1]
        out["followup_ops"] = bl.profiled_ops(lambda m=model: m.forward(turn, h).argmax().item(), device)

    # batch-1 decode after a p-token prefill
    prompt = text(p).tolist()
    with torch.inference_mode():
        first = model.forward(prompt, 0).argmax()
    ceiling = bandwidth or bl.H100_BANDWIDTH
    traffic = bl.decode_bytes_per_token(model, p + n // 2)
    decode: dict = {"prefill_tokens": p, "tokens": n, "bytes_per_token": traffic, "ceiling_bytes_per_s": ceiling,
                    "ceiling_tokens_per_s": ceiling / traffic["total"]}  # fmt: skip
    # (mode, CUDA graphs, compiled, fused eager kernels): "eager" is the plain torch ops (the old
    # baseline), "graphs-unfused" the graphs before engine/fused.py, "graphs" as the app runs
    modes = [("eager", False, False, False)]
    if is_cuda:
        modes += [("graphs-unfused", True, False, False), ("graphs", True, False, True)]
    if plan.cuda_compiled if compiled is None else compiled:
        modes.append(("compiled", is_cuda, True, True))
    for mode, graphs, compiled, fused_kernels in modes:
        try:
            with bl.fused_kernels(fused_kernels):
                r = bl.engine_decode(model, first, p, n, plan.cuda_repeats, graphs, compiled)
            r["bandwidth_share"] = r["tokens_per_s"] * traffic["total"] / ceiling
            r["ops_per_layer"] = r["ops"]["per_step"] / cfg.text.num_layers
            decode[mode] = r
        except Exception as e:
            decode[mode] = {"error": repr(e)[:500]}
    out["decode"] = decode
    if long:  # the same steps after a long context (its cache as the runs above left it: the
        # values do not matter, the bytes attention reads do), with and without the fused kernels
        traffic = bl.decode_bytes_per_token(model, long + n // 2)
        decode_long: dict = {"context": long, "bytes_per_token": traffic}
        for mode, fused_kernels in (("graphs-unfused", False), ("graphs", True)):
            try:
                with bl.fused_kernels(fused_kernels):
                    r = bl.engine_decode(model, first, long, n, plan.cuda_repeats, True, False)
                r["bandwidth_share"] = r["tokens_per_s"] * traffic["total"] / ceiling
                decode_long[mode] = r
            except Exception as e:
                decode_long[mode] = {"error": repr(e)[:500]}
        out["decode_long"] = decode_long
    if is_cuda:
        from internvl_chat.engine import fused

        out["fused_kernels_ok"] = fused.verdicts("cuda")  # the kernels' checks against the torch ops, by dtype
        out["peak_gpu_alloc_bytes"] = torch.cuda.max_memory_allocated(device) - base_alloc
    del model
    _free(device)
    return out


def shape_rows(plan: bl.Plan) -> list[tuple[str, str]]:
    """(shape, variant) in measuring order, so that the most wanted rows come first when time runs
    out: the first two variants (W4 as the app runs, and bf16) of every shape, 8B first, then the
    other variants (our own and GemLite's int4 kernels: each a long cold compile, and the gemv
    section times their kernels anyway)."""
    if plan.cuda_rows is not None:
        return list(plan.cuda_rows)
    return [(shape, variant) for variants in (plan.cuda_variants[:2], plan.cuda_variants[2:])
            for shape in plan.cuda_shapes for variant in variants]  # fmt: skip


def variant_backend(variant: str) -> tuple[bool, str]:
    """A shapes-row variant as (W4?, Int4Linear backend): "w4" → the default (auto: tinygemm on
    CUDA), "w4-triton" → "triton", "bf16" → no int4."""
    if variant == "bf16":
        return False, "auto"
    if variant == "w4":
        return True, "auto"
    if variant.startswith("w4-"):
        return True, variant.removeprefix("w4-")
    raise ValueError(f"unknown shapes variant {variant!r}")


def section_shapes(plan: bl.Plan, device: torch.device, deadline: float | None, start: float, rows_done=None) -> dict:
    """`rows_done(results)`, if given, hears the results so far after each measured row (run()
    saves them: a step killed by its timeout keeps its finished rows)."""
    bandwidth = bl.copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    results: dict = {"copy_bandwidth_bytes_per_s": bandwidth, "bandwidth_ceiling_bytes_per_s": bandwidth}
    bl.log(f"  copy bandwidth {bandwidth / 1e9:.0f} GB/s", start)
    compile_times: list[float] = []  # of the rows so far (largest shape first)
    for shape, variant in shape_rows(plan):
        key = f"{shape} {variant}"
        if deadline is not None and time.perf_counter() > deadline:
            results[key] = {"skipped": "time budget spent"}
            continue
        w4, backend = variant_backend(variant)
        why = bl.int4_backend_unavailable(backend, device) if w4 else None
        if why is not None:  # recorded at no cost, in its place: the row a build with the backend measures
            results[key] = {"skipped": f"int4 backend {backend!r} not available: {why}"}
            continue
        # no compile once less time is left than one takes: the longest so far, else about a
        # minute (a cold compile of a 28-layer step)
        compile_cost = max(compile_times, default=60.0)
        compiled = plan.cuda_compiled and (deadline is None or time.perf_counter() < deadline - compile_cost)
        bl.log(f"  {key} ...", start)
        try:
            cfg = bl.shape_config(shape, w4=w4)
            results[key] = measure_shape(cfg, plan, device, bandwidth=bandwidth, compiled=compiled, backend=backend)
            results[key]["int4_backend"] = backend if w4 else None
            d = results[key]["decode"]
            if "compile_s" in d.get("compiled", {}):
                compile_times.append(d["compiled"]["compile_s"])
            bl.log(f"  {key}: " + ", ".join(f"{m} {d[m].get('tokens_per_s', float('nan')):.0f} tok/s"
                                             for m in ("eager", "graphs", "compiled") if m in d), start)  # fmt: skip
        except Exception as e:
            results[key] = {"error": repr(e), "traceback": traceback.format_exc(limit=4)}
            bl.log(f"  {key}: FAILED {e!r}", start)
        _free(device)
        if rows_done is not None:
            rows_done(results)
    return results


def section_gemv(plan: bl.Plan, device: torch.device, deadline: float | None, start: float, rows_done=None) -> dict:
    """Issue 10 item 4: each int4 linear backend that this build and device have (tinygemm's kernel
    and its dense path, "triton", "gemlite", ...) and a bf16 nn.Linear on every decoder linear of
    the InternVL3 LLMs, by rows M (1: decode; more: prefill): µs per call, effective GB/s and its
    share of the copy bandwidth measured here, the output checked against the dequantized weight,
    the fastest int4 backend per (shape, M). Its own time budget (`plan.gemv_budget_s`): shapes
    and rows left when it is spent are recorded as skipped, 8B first. `rows_done`: as for
    section_shapes, after each measured shape."""
    bandwidth = bl.copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    own = time.perf_counter() + plan.gemv_budget_s
    section_deadline = min(own, deadline) if deadline is not None else own
    unavailable = {label: bl.gemv_variant_unavailable(label, device)
                   if plan.gemv_columns is None or label in plan.gemv_columns else "not selected (--gemv-columns)"
                   for label in bl.GEMV_VARIANTS}  # fmt: skip
    labels = [label for label, why in unavailable.items() if why is None]
    out: dict = {
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": list(plan.gemv_rows),
        "columns": {label: {"int4_backend": bl.GEMV_VARIANTS[label][0], "available": why is None, "reason": why}
                    for label, why in unavailable.items()},  # fmt: skip
        "max_rel_error": bl.GEMV_MAX_REL_ERROR,
        "bytes_note": "resident bytes of the layer (weights, scales, zeros) + bf16 activations in and out, per call",
        "shapes": {},
    }
    bl.log(f"  copy bandwidth {bandwidth / 1e9:.0f} GB/s; columns: {', '.join(labels)}", start)
    seed = 0
    for model in plan.cuda_shapes:
        for layer, (k, n) in bl.llm_linear_shapes(model).items():
            key = f"{model} {layer}"
            seed += 1
            if time.perf_counter() > section_deadline:
                out["shapes"][key] = {"skipped": "time budget spent"}
                continue
            try:
                r = bl.measure_linear(k, n, plan.gemv_rows, labels, device, bandwidth, section_deadline, seed)
                r["choice"] = bl.choice_by_rows(r["rows"])
                out["shapes"][key] = r
                one = r["rows"].get("1", {})
                bl.log(f"  {key} {k}→{n}: M=1 " + ", ".join(f"{lb} {one[lb]['us']:.1f} µs" for lb in labels
                                                            if "us" in one.get(lb, {})), start)  # fmt: skip
            except Exception as e:
                out["shapes"][key] = {"error": repr(e), "traceback": traceback.format_exc(limit=4)}
                bl.log(f"  {key}: FAILED {e!r}", start)
            _free(device)
            if rows_done is not None:
                rows_done(out)
    if "tinygemm" in labels and "tinygemm-dense" in labels:  # the value for Int4Linear.dense_threshold
        from internvl_chat.quant import Int4Linear

        out["dense_from_rows"] = dense_from_rows(kernel_vs_dense(out["shapes"]))
        out["current_dense_threshold"] = Int4Linear.dense_threshold
    return out


def _sweep_start(plan: bl.Plan, device: torch.device, budget_s: float, deadline: float | None, default, extra,
                 label, start: float) -> tuple[float, list, dict]:  # fmt: skip
    """What a sweep section starts from: its deadline (its own budget, within the run's), its
    configurations (the default first, each other once) and its record so far (the copy
    bandwidth, the model, the configurations by `label`), logged."""
    bandwidth = bl.copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    own = time.perf_counter() + budget_s
    configs = [default] + [c for c in dict.fromkeys(extra) if c != default]
    out = {"copy_bandwidth_bytes_per_s": bandwidth, "model": plan.sweep_shape, "default_config": label(default),
           "configs": {label(c): c._asdict() for c in configs}}  # fmt: skip
    bl.log(f"  copy bandwidth {bandwidth / 1e9:.0f} GB/s; {len(configs)} configurations, default {label(default)}", start)
    return (min(own, deadline) if deadline is not None else own), configs, out


def _prepare_sweep_shapes(model: str, records: dict, start: float, prepare) -> dict:
    """`prepare(k, n, seed)` → (tensors, record) for each decoder linear of `model`: the tensors by
    key, the records (or a failure's) into `records`."""
    prepared = {}
    for seed, (layer, (k, n)) in enumerate(bl.llm_linear_shapes(model).items(), 1):
        key = f"{model} {layer}"
        try:
            prepared[key], records[key] = prepare(k, n, seed)
        except Exception as e:
            records[key] = {"error": repr(e), "traceback": traceback.format_exc(limit=4)}
            bl.log(f"  {key}: FAILED {e!r}", start)
    return prepared


def section_gemv_sweep(plan: bl.Plan, device: torch.device, deadline: float | None, start: float, rows_done=None) -> dict:
    """The triton GEMV's launch configuration, tuned: on the decoder linears of `plan.sweep_shape`
    (8B: fused qkv, o, fused gate_up, down) at rows `plan.sweep_rows`, the module's default
    configuration (the baseline) and then each of `plan.sweep_configs` (most promising first;
    configurations outer, shapes inner, so a spent budget leaves whole configurations out): µs,
    share of the copy bandwidth, output check, per shape the best configuration against the
    default and tinygemm, and the best one over all shapes. Its own time budget
    (`plan.sweep_budget_s`); cells left are recorded as skipped. `rows_done`: after each configuration."""
    from internvl_chat.quant import triton_gemv

    why = triton_gemv.triton_unavailable_reason(device)
    if why is not None:
        return {"skipped": f"the triton backend cannot run here: {why}"}
    default = triton_gemv.default_config()
    extra = (triton_gemv.GemvConfig(*t) for t in plan.sweep_configs)
    section_deadline, configs, out = _sweep_start(plan, device, plan.sweep_budget_s, deadline, default, extra, bl.sweep_label, start)
    default_label, bandwidth = out["default_config"], out["copy_bandwidth_bytes_per_s"]
    out.update({
        "rows": list(plan.sweep_rows),
        "max_rel_error": bl.GEMV_MAX_REL_ERROR,
        "bytes_note": "resident bytes of the layer (weights, scales, zeros) + bf16 activations in and out, per call",
        "shapes": {},
    })
    prepared = _prepare_sweep_shapes(plan.sweep_shape, out["shapes"], start,
                                     lambda k, n, seed: bl.prepare_sweep_shape(k, n, plan.sweep_rows, device, bandwidth, seed))  # fmt: skip
    for config in configs:
        label = bl.sweep_label(config)
        for key, shape in prepared.items():
            cells = out["shapes"][key]["configs"].setdefault(label, {})
            for m in plan.sweep_rows:
                if time.perf_counter() > section_deadline:
                    cells[str(m)] = {"skipped": "time budget spent"}
                else:
                    cells[str(m)] = bl.measure_gemv_config(shape, config, m, device, bandwidth)
        one = [(key, r["configs"][label].get(str(plan.sweep_rows[0]), {})) for key, r in out["shapes"].items() if "configs" in r]
        bl.log(f"  {label}: " + ", ".join(f"{key.split()[-1]} " + (f"{c['us']:.1f} µs" if "us" in c else
                                                                      "failed" if "error" in c else "skipped")
                                          for key, c in one), start)  # fmt: skip
        if rows_done is not None:
            rows_done(out)
    for r in out["shapes"].values():
        if "configs" in r:
            r["best"] = {str(m): bl.best_config(r, m, default_label) for m in plan.sweep_rows}
    out["best_overall"] = {str(m): bl.best_overall(out["shapes"], m, default_label) for m in plan.sweep_rows}
    del prepared
    return out


def section_dequant_sweep(plan: bl.Plan, device: torch.device, deadline: float | None, start: float, rows_done=None) -> dict:
    """The one-pass dequantization kernels' launch configuration, tuned: both layouts (tinygemm's,
    which the app's default backend dequantizes for prefill, and the triton backend's repacked
    one) on the decoder linears of `plan.sweep_shape`, the module's default configuration (the
    baseline, whose outputs are the reference) and then each of `plan.dqsweep_configs`
    (configurations outer, shapes and kernels inner, so a spent budget leaves whole configurations
    out): µs, GB/s, share of the copy bandwidth, output bit for bit against the default's, per
    shape and over all shapes the best configuration against the default. Its own time budget
    (`plan.dqsweep_budget_s`); cells left are recorded as skipped. `rows_done`: after each configuration."""
    from internvl_chat.quant import triton_dequant, triton_gemv

    why = triton_gemv.triton_unavailable_reason(device)
    if why is not None:
        return {"skipped": f"the Triton kernels cannot run here: {why}"}
    default = triton_dequant.default_config()
    extra = (triton_dequant.DequantConfig(*t) for t in plan.dqsweep_configs)
    section_deadline, configs, out = _sweep_start(plan, device, plan.dqsweep_budget_s, deadline, default, extra, bl.dequant_label, start)
    default_label, bandwidth = out["default_config"], out["copy_bandwidth_bytes_per_s"]
    out.update({
        "group_size": bl.AWQ_GROUP,
        "dtype": "bfloat16",
        "kernels": list(bl.DEQUANT_KERNELS),
        "bytes_note": "read: the packed weight, scales and zeros; written: the dense bf16 weight; per call",
        "check_note": "each output bit for bit against the default configuration's output on the same tensors",
        "shapes": {},
    })
    prepared = _prepare_sweep_shapes(plan.sweep_shape, out["shapes"], start, lambda k, n, seed: bl.prepare_dequant_shape(k, n, device, seed))
    for config in configs:
        label = bl.dequant_label(config)
        for key, shape in prepared.items():
            for kernel, r in out["shapes"][key]["kernels"].items():
                if time.perf_counter() > section_deadline:
                    r["configs"][label] = {"skipped": "time budget spent"}
                else:
                    r["configs"][label] = bl.measure_dequant_config(shape, kernel, config, r["bytes"], device, bandwidth)
        bl.log(f"  {label}: " + "; ".join(
            f"{kernel} " + ", ".join(f"{key.split()[-1]} " + _dequant_brief(out["shapes"][key]["kernels"][kernel]["configs"][label])
                                    for key in prepared)
            for kernel in bl.DEQUANT_KERNELS), start)  # fmt: skip
        if rows_done is not None:
            rows_done(out)
    records = [out["shapes"][key] for key in prepared]
    for r in records:
        for k_record in r["kernels"].values():
            k_record["best"] = bl.best_dequant_config(k_record["configs"], default_label)
    out["best_overall"] = {kernel: bl.best_dequant_overall(records, kernel, default_label) for kernel in bl.DEQUANT_KERNELS}
    del prepared
    return out


def _dequant_brief(cell: dict) -> str:
    if "us" in cell:
        return f"{cell['us']:.1f} µs" + ("" if cell["ok"] else " WRONG")
    return "failed" if "error" in cell else "skipped"


def kernel_vs_dense(shapes: dict) -> dict[str, dict[str, dict[str, float]]]:
    """The gemv section's tinygemm and tinygemm-dense times as `dense_from_rows` reads them: per
    shape, per measured row count, {kernel_ms, dense_ms}."""
    table = {}
    for key, r in shapes.items():
        rows = {m: {"kernel_ms": row["tinygemm"]["us"] / 1e3, "dense_ms": row["tinygemm-dense"]["us"] / 1e3}
                for m, row in r.get("rows", {}).items() if "us" in row.get("tinygemm", {}) and "us" in row.get("tinygemm-dense", {})}  # fmt: skip
        if rows:
            table[key] = rows
    return table


def dense_from_rows(table: dict[str, dict[str, dict[str, float]]]) -> int | None:
    """The smallest row count from which dense is at least as fast for every shape, and stays so
    for every larger row count measured (None if there is none)."""
    rows = sorted(set.intersection(*({int(m) for m in row} for row in table.values()))) if table else []
    best = None
    for m in reversed(rows):
        if all(row[str(m)]["dense_ms"] <= row[str(m)]["kernel_ms"] for row in table.values()):
            best = m
        else:
            break
    return best


# ---------------------------------------------------------------------------------------------
# Issue 9: time to the first prompt


PROMPT_READY = b"\x1b[?2004h"  # prompt_toolkit turns bracketed paste on when it waits for input


def _seconds_to_first_prompt(repo: Path, timeout: float = 300.0) -> float:
    """Start the REPL on the embedded demo model in a pseudo-terminal; seconds until it waits for input."""
    import fcntl
    import os
    import select
    import struct
    import subprocess
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    with tempfile.TemporaryDirectory(prefix="internvl-startup-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "TERM": "xterm-256color",
               "PROMPT_TOOLKIT_NO_CPR": "1", "INTERNVL_CHAT_CONFIG": os.devnull, "PYTHONPATH": str(repo)}  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "internvl_chat.cli", "--device", "cpu", "--no-history"],
                                stdin=slave, stdout=slave, stderr=slave, cwd=repo, env=env, start_new_session=True)  # fmt: skip
        os.close(slave)
        seen = b""
        try:
            while PROMPT_READY not in seen:
                chunk = b""
                if select.select([master], [], [], 1.0)[0]:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: the REPL has gone
                        pass
                    seen += chunk
                if not chunk and (proc.poll() is not None or time.perf_counter() - start > timeout):
                    raise RuntimeError(f"the REPL showed no prompt; it wrote {seen[-300:]!r}")
            elapsed = time.perf_counter() - start
            os.write(master, b"\x04")  # Ctrl-D: quit
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
    return elapsed


def _seconds_to_import_torch() -> float:
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def section_startup(plan: bl.Plan, repo: Path = Path(__file__).resolve().parent.parent) -> dict:
    """Median of interleaved runs: `import torch` alone, then the REPL to its first prompt."""
    torch_s, prompt_s = [], []
    for _ in range(max(plan.repeats, 3)):
        torch_s.append(_seconds_to_import_torch())
        prompt_s.append(_seconds_to_first_prompt(repo))
    torch_med, prompt_med = bl.median(torch_s), bl.median(prompt_s)
    return {
        "import_torch_s": torch_med,
        "first_prompt_s": prompt_med,
        "ratio": prompt_med / torch_med,
        "ratio_of_fastest": min(prompt_s) / min(torch_s),  # steadier on a machine shared with other jobs
        "import_torch_runs_s": torch_s,
        "first_prompt_runs_s": prompt_s,
        "model": "embedded demo model, --device cpu",
    }


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(x, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def render_shapes(sh: dict) -> list[str]:
    bw = sh.get("copy_bandwidth_bytes_per_s") or sh.get("bandwidth_ceiling_bytes_per_s")
    lines = ["", f"[InternVL3 shapes, random weights, batch 1] decode tok/s (BW = bytes read per token × tok/s "
                 f"÷ the measured copy bandwidth {bw / 1e9:.0f} GB/s), ops/layer = kernels (GPU) or aten calls (CPU)",
             f"  {'model':24}{'eager':>7}{'graphs':>8}{'compiled':>9}{'BW':>5}{'ops/layer e/g/c':>17}{'GB/tok':>8}"
             f"{'TTFT 13t ms':>12}{'prefill tok/s':>14}{'follow-up ms':>30}{'compile s':>10}{'peak GiB':>9}"]  # fmt: skip
    for key, r in sh.items():
        if not isinstance(r, dict):
            continue
        if "decode" not in r:
            lines.append(f"  {key:24}{r.get('error') or r.get('skipped')}")
            continue
        d, pf = r["decode"], r["prefill"]

        def rate(mode: str) -> str:
            return _fmt(d.get(mode, {}).get("tokens_per_s"), ".0f")

        best, _, best_share = best_decode(d)
        share = best_share * 100 if best else None
        ops = "/".join(_fmt(d.get(m, {}).get("ops_per_layer"), ".0f") for m in ("eager", "graphs", "compiled"))
        follow = "/".join(_fmt(v, ".1f") for v in r.get("followup_ttft_ms", {}).values())
        if "followup_ops" in r:  # the ops' own time of the last follow-up, after its wall time
            follow += f" ({r['followup_ops']['op_us'] / 1000:.1f})"
        if "followup_ttft_ms_graphs" in r:  # then the same turns replayed from prefill graphs
            follow += " g " + "/".join(_fmt(v, ".1f") for v in r["followup_ttft_ms_graphs"].values())
        lines.append(
            f"  {key:24}{rate('eager'):>7}{rate('graphs'):>8}{rate('compiled'):>9}{_fmt(share, '.0f'):>4}%{ops:>17}"
            f"{d['bytes_per_token']['total'] / 1e9:>8.2f}{pf['ttft_ms']:>12.1f}{pf['llm_prefill_tokens_per_s']:>14.0f}"
            f"{follow:>30}{_fmt(d.get('compiled', {}).get('compile_s'), '.0f'):>10}"
            f"{r.get('peak_gpu_alloc_bytes', 0) / 2**30:>9.1f}"
        )
        for m in ("eager", "graphs-unfused", "graphs", "compiled"):
            if "error" in d.get(m, {}):
                lines.append(f"    {m}: {d[m]['error'][:300]}")
        long = r.get("decode_long", {})
        if long:
            lines.append(f"    after {long['context']:,} tokens (graphs): " + ", ".join(
                f"{m} {_fmt(long.get(m, {}).get('tokens_per_s'), '.0f')} tok/s" for m in ("graphs-unfused", "graphs")))  # fmt: skip
        if "tokens_per_s" in d.get("graphs-unfused", {}):
            lines.append(f"    graphs without the fused kernels (engine/fused.py): {rate('graphs-unfused')} tok/s, "
                         f"{_fmt(d['graphs-unfused'].get('ops_per_layer'), '.0f')} kernels a layer")
        if "followup_graphs_error" in r:
            lines.append(f"    follow-up in graphs: {r['followup_graphs_error'][:300]}")
    hist = next((list(r["followup_ttft_ms"]) for r in sh.values() if isinstance(r, dict) and "followup_ttft_ms" in r), [])
    if hist:
        lines.append(f"  follow-up = time to first token of a short turn after {' / '.join(hist)} tokens of history, eager "
                     f"(in brackets: the time its kernels, or aten ops on a CPU, take as the profiler times them; "
                     f"after g: replayed from a captured prefill graph, CUDA)")
    for key, r in sh.items():  # where the fastest mode's step goes, by kernel (the first few)
        if not (isinstance(r, dict) and "decode" in r):
            continue
        mode = best_decode(r["decode"])[0]
        top = r["decode"].get(mode, {}).get("ops", {}).get("top") if mode else None
        if top:
            shown = "; ".join(f"{t['name'][:48]} {t['us']:.0f} µs ×{t['calls']}" for t in top[:6])
            lines.append(f"  {key} ({mode}) per step: {shown}")
    for key, r in sh.items():  # each other int4 backend's best decode next to tinygemm's ("w4")
        shape, _, variant = key.rpartition(" ")
        base = sh.get(f"{shape} w4")
        if not (variant.startswith("w4-") and isinstance(r, dict) and "decode" in r and isinstance(base, dict) and "decode" in base):
            continue
        (mode, rate, share), (bmode, brate, bshare) = best_decode(r["decode"]), best_decode(base["decode"])
        if rate and brate:
            lines.append(f"  {shape} W4 decode: {variant.removeprefix('w4-')} {rate:.0f} tok/s ({mode}, {share * 100:.0f} % of "
                         f"the copy bandwidth) vs tinygemm {brate:.0f} tok/s ({bmode}, {bshare * 100:.0f} %): ×{rate / brate:.2f}")  # fmt: skip
    return lines


def best_decode(d: dict) -> tuple[str | None, float | None, float | None]:
    """(mode, tokens/s, share of the copy bandwidth) of the fastest decode mode of a shapes row."""
    best = max((m for m in ("eager", "graphs", "compiled") if "tokens_per_s" in d.get(m, {})),
               key=lambda m: d[m]["tokens_per_s"], default=None)  # fmt: skip
    return (best, d[best]["tokens_per_s"], d[best]["bandwidth_share"]) if best else (None, None, None)


def render_gemv(g: dict) -> list[str]:
    """The gemv section as one line per (shape, M): µs and share of the copy bandwidth per column,
    the fastest int4 column marked *, a failed output check marked !; then the choice per shape."""
    cols = [label for label, c in g["columns"].items() if c["available"]]
    lines = ["", f"[int4 linears by rows M] µs per call and share of the copy bandwidth ({g['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s) "
                 f"of the layer's bytes + activations; * fastest int4, ! output off the dequantized reference "
                 f"by > {g['max_rel_error']:g} of its scale; speedup = bf16 µs ÷ fastest int4 µs",
             f"  {'shape':33}{'M':>5}" + "".join(f"{c:>17}" for c in cols) + f"{'fastest':>16}{'speedup':>9}"]  # fmt: skip
    for key, r in g["shapes"].items():
        if "rows" not in r:
            lines.append(f"  {key:33}{r.get('error') or r.get('skipped')}")
            continue
        label = f"{key} {r['in_features']}→{r['out_features']}"
        for m, row in r["rows"].items():
            if "skipped" in row:
                lines.append(f"  {label:33}{m:>5}  {row['skipped']}")
            else:
                cells = ""
                for c in cols:
                    cell = row.get(c, {})
                    if "us" in cell:
                        mark = "*" if c == row.get("fastest") else ("!" if not cell["ok"] else " ")
                        cells += f"{cell['us']:>10.1f}{cell['bandwidth_share'] * 100:>5.0f}%{mark}"
                    else:
                        cells += f"{'error' if 'error' in cell else '-':>17}"
                lines.append(f"  {label:33}{m:>5}{cells}{row.get('fastest') or '-':>16}{_fmt(row.get('fastest_vs_bf16'), '.2f'):>8}×")
            label = ""
        for c, err in r.get("errors", {}).items():
            lines.append(f"    {c}: not built: {err[:200]}")
        for c, chk in r.get("check", {}).items():
            if chk["ok"] is False:
                lines.append(f"    {c}: CHECK FAILED, max |err| / max |ref| = {_fmt(chk['max_rel_error'], '.3g')}")
    lines.append("  choose per shape (fastest int4 backend by rows M):")
    for key, r in g["shapes"].items():
        if r.get("choice"):
            runs = " · ".join(f"{c['from_rows']}" + (f"–{c['to_rows']}" if c["to_rows"] != c["from_rows"] else "") + f" {c['backend']}"
                              for c in r["choice"])  # fmt: skip
            lines.append(f"    {key:31}{runs}")
    for label, c in g["columns"].items():
        if not c["available"]:
            lines.append(f"  {label}: not measured: {c['reason']}")
    if "dense_from_rows" in g:
        lines.append(f"  tinygemm's dense path at least as fast from {g['dense_from_rows']} rows on (every shape); "
                     f"Int4Linear.dense_threshold is {g['current_dense_threshold']}")  # fmt: skip
    return lines


def render_gemv_sweep(w: dict) -> list[str]:
    """The gemv-sweep section: one line per (configuration, M) with µs and share of the copy
    bandwidth per shape (* the shape's best, ! a failed output check), tinygemm's line below,
    then per M the best configuration per shape and over all shapes, and why configurations failed."""
    if "shapes" not in w:
        return ["", f"[triton GEMV launch configurations] skipped: {w.get('skipped') or w.get('error')}"]
    shapes = {key: r for key, r in w["shapes"].items() if "configs" in r}
    names = [key.split()[-1] for key in shapes]
    lines = ["", f"[triton GEMV launch configurations] {w['model']}: µs per call and share of the copy bandwidth "
                 f"({w['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s); * best per shape, ! output off the reference by "
                 f"> {w['max_rel_error']:g} of its scale; n BLOCK_N, k BLOCK_K, w NUM_WARPS, p TARGET_PROGRAMS; "
                 f"the default {w['default_config']} first",
             "  " + " · ".join(f"{key.split()[-1]} {r['in_features']}→{r['out_features']}" for key, r in shapes.items()),
             f"  {'config':22}{'M':>4}" + "".join(f"{name:>15}" for name in names)]  # fmt: skip
    for key, r in w["shapes"].items():
        if key not in shapes:
            lines.append(f"  {key}: {r.get('error') or r.get('skipped')}")

    def cell(c: dict, best: bool) -> str:
        if "us" in c:
            mark = "*" if best else ("!" if not c["ok"] else " ")
            return f"{c['us']:>9.1f}{c['bandwidth_share'] * 100:>4.0f}%{mark}"
        return f"{'failed' if 'error' in c else '-':>15}"

    for label in w["configs"]:
        for m in w["rows"]:
            row = [cell(r["configs"].get(label, {}).get(str(m), {}), (r.get("best", {}).get(str(m)) or {}).get("config") == label)
                   for r in shapes.values()]  # fmt: skip
            lines.append(f"  {label:22}{m:>4}" + "".join(row))
    for m in w["rows"]:
        lines.append(f"  {'tinygemm':22}{m:>4}" + "".join(cell(r["tinygemm"].get(str(m), {}), False) for r in shapes.values()))
    for m in w["rows"]:
        lines.append(f"  best at M={m} (× = the other's µs ÷ the best's):")
        for name, r in zip(names, shapes.values()):
            b = (r.get("best") or {}).get(str(m))
            lines.append(f"    {name:10}{b['config']:22}×{_fmt(b['vs_default'], '.2f')} vs the default, ×{_fmt(b['vs_tinygemm'], '.2f')} vs tinygemm"
                         if b else f"    {name:10}none passed")  # fmt: skip
        o = (w.get("best_overall") or {}).get(str(m))
        if o:
            lines.append(f"    {'all':10}{o['config']:22}×{_fmt(o['vs_default'], '.2f')} vs the default "
                         f"({o['total_us']:.1f} vs {_fmt(o['default_total_us'])} µs for the {len(shapes)} shapes)")  # fmt: skip
    failures: dict[tuple[str, str], list[str]] = {}
    for name, r in zip(names, shapes.values()):
        for label, cells in r["configs"].items():
            for m, c in cells.items():
                if "error" in c:
                    failures.setdefault((label, c["error"]), []).append(f"{name} M={m}")
    for (label, error), where in failures.items():
        lines.append(f"  {label} failed ({', '.join(where)}): {error[:200]}")
    for name, r in zip(names, shapes.values()):
        why = r["tinygemm"].get("error") or r["tinygemm"].get("not_measured")
        if why:
            lines.append(f"  tinygemm on {name} not measured: {why[:200]}")
    return lines


def render_dequant_sweep(w: dict) -> list[str]:
    """The dequant-sweep section: per kernel one line per configuration with µs and share of the
    copy bandwidth per shape (* the shape's best, ! output not the default's bits), then the best
    configuration per shape and over all shapes, and why configurations failed."""
    if "shapes" not in w:
        return ["", f"[dequantization launch configurations] skipped: {w.get('skipped') or w.get('error')}"]
    shapes = {key: r for key, r in w["shapes"].items() if "kernels" in r}
    names = [key.split()[-1] for key in shapes]
    lines = ["", f"[dequantization launch configurations] {w['model']}, group {w['group_size']}, {w['dtype']} out: µs per call "
                 f"and share of the copy bandwidth ({w['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; bytes read + written); "
                 f"* best per shape, ! output not bit for bit the default's; n BLOCK_N, w BLOCK_W, nw NUM_WARPS; "
                 f"the default {w['default_config']} first",
             "  " + " · ".join(f"{key.split()[-1]} {r['in_features']}→{r['out_features']}" for key, r in shapes.items())]  # fmt: skip
    for key, r in w["shapes"].items():
        if key not in shapes:
            lines.append(f"  {key}: {r.get('error') or r.get('skipped')}")

    def cell(c: dict, best: bool) -> str:
        if "us" in c:
            mark = "*" if best else ("!" if not c["ok"] else " ")
            return f"{c['us']:>9.1f}{c['bandwidth_share'] * 100:>4.0f}%{mark}"
        return f"{'failed' if 'error' in c else '-':>15}"

    failures: dict[tuple[str, str], list[str]] = {}
    for kernel in w["kernels"]:
        lines.append(f"  {kernel + ' layout':22}" + "".join(f"{name:>15}" for name in names))
        for label in w["configs"]:
            row = []
            for r in shapes.values():
                k_record = r["kernels"][kernel]
                row.append(cell(k_record["configs"].get(label, {}), (k_record.get("best") or {}).get("config") == label))
            lines.append(f"  {label:22}" + "".join(row))
        lines.append(f"  best, {kernel} layout (× = the default's µs ÷ the best's):")
        for name, r in zip(names, shapes.values()):
            b = r["kernels"][kernel].get("best")
            lines.append(f"    {name:10}{b['config']:18}{b['us']:>9.1f} µs {b['gb_per_s']:>7.0f} GB/s {b['bandwidth_share'] * 100:>4.0f}% "
                         f"×{_fmt(b['vs_default'], '.2f')} vs the default" if b else f"    {name:10}none passed")  # fmt: skip
            for label, c in r["kernels"][kernel]["configs"].items():
                if "error" in c:
                    failures.setdefault((label, c["error"]), []).append(f"{kernel} {name}")
                elif c.get("ok") is False:
                    lines.append(f"    {name:10}{label:18}WRONG: {c.get('mismatches')} weights differ from the default's")
        o = (w.get("best_overall") or {}).get(kernel)
        if o:
            lines.append(f"    {'all':10}{o['config']:18}×{_fmt(o['vs_default'], '.2f')} vs the default "
                         f"({o['total_us']:.1f} vs {_fmt(o['default_total_us'])} µs for the {len(shapes)} shapes)")  # fmt: skip
        else:
            lines.append(f"    {'all':10}none passed on every shape")
    for (label, error), where in failures.items():
        lines.append(f"  {label} failed ({', '.join(where)}): {error[:200]}")
    return lines


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"internvl-chat benchmark — {m['date_utc']}, commit {m['git_commit'][:12]}{' (dirty)' if m.get('git_dirty') else ''}",
        f"machine: {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads); "
        f"torch {m['torch']}, transformers {m['transformers']}; plan {report['plan']['name']}",
    ]
    s = report.get("sections", {})
    for name, title in (("engine", "engine vs transformers"), ("overhead", "engine vs transformers, tiny model (overhead-bound)")):
        e = s.get(name)
        if not e or "ours" not in e:
            continue
        o, t = e["ours"], e["transformers"]
        lines += [
            "",
            f"[{title}] {e['dtype']}, prompt {e['prompt_tokens']} tokens ({e['image_tiles']} tiles), "
            f"{e['decode_tokens']} new tokens, {e['transformers_attention']} attention in transformers",
            f"  {'':14}{'vision ms':>11}{'prefill ms':>12}{'TTFT ms':>10}{'decode tok/s':>14}",
            f"  {'ours':14}{_fmt(o['vision_ms']):>11}{_fmt(o['prefill_ms']):>12}{_fmt(o['ttft_ms']):>10}{_fmt(o['decode_tokens_per_s']):>14}",
            f"  {'transformers':14}{_fmt(t['vision_ms']):>11}{_fmt(t['prefill_ms']):>12}{_fmt(t['ttft_ms']):>10}{_fmt(t['decode_tokens_per_s']):>14}",
            f"  decode ×{_fmt(e['decode_speedup'], '.2f')} (target ≥ 2), TTFT ×{_fmt(e['ttft_speedup'], '.2f')}, "
            f"prefill ×{_fmt(e['prefill_speedup'], '.2f')}, vision ×{_fmt(e['vision_speedup'], '.2f')}; "
            f"greedy tokens agree {e['greedy_tokens_agree']}",
        ]
    ld = s.get("load")
    if ld and "load_s" in ld:
        lines += [
            "",
            f"[load] {ld['dtype']} on {ld['device']} from the bf16 checkpoint ({ld['checkpoint_file_bytes'] / 2**20:.1f} MiB): "
            f"{ld['load_s']:.2f} s; weights {ld['weights_bytes'] / 2**20:.1f} MiB (+{ld['kv_cache_bytes'] / 2**20:.1f} MiB KV cache)",
            f"  peak RSS +{ld['peak_rss_delta_bytes'] / 2**20:.1f} MiB = ×{ld['peak_rss_over_weights']:.2f} of the weights (target ≤ 1.3): "
            f"anonymous ×{ld['peak_rss_anon_over_weights']:.2f}, file-backed (checkpoint mmap) "
            f"+{ld['peak_rss_file_delta_bytes'] / 2**20:.1f} MiB; cold process (first-use imports counted) "
            f"×{ld['cold_process']['peak_rss_over_weights']:.2f}",
        ]
        if "bf16_target" in ld:
            b = ld["bf16_target"]
            lines.append(
                f"  bf16 target: peak RSS ×{b['peak_rss_over_weights']:.2f} of {b['weights_bytes'] / 2**20:.1f} MiB "
                f"(anonymous ×{b['peak_rss_anon_over_weights']:.2f}, file-backed +{b['peak_rss_file_delta_bytes'] / 2**20:.1f} MiB)"
            )
        if "peak_gpu_alloc_bytes" in ld:
            lines.append(f"  GPU: peak allocated ×{ld['peak_gpu_over_weights']:.2f} of the weights")
    c = s.get("chunk")
    if c and "turns" in c:
        t1 = c["turn1"]
        lines += [
            "",
            f"[chunk prefilling] {c['dtype']}, {c['image_tiles']}-tile image in turn 1 ({t1['prompt_tokens']} tokens: "
            f"vision {t1['vision_ms']:.0f} ms, prefill {t1['prefill_ms']:.0f} ms)",
            f"  {'turn':>6}{'history':>9}{'chunk':>7}{'re-prefill ms':>15}{'chunk ms':>10}{'speedup':>9}",
        ]
        for t in c["turns"]:
            lines.append(
                f"  {t['turn']:>6}{t['history_tokens']:>9}{t['chunk_tokens']:>7}{t['reprefill_ttft_ms']:>15.1f}"
                f"{t['chunk_ttft_ms']:>10.1f}{t['speedup']:>8.1f}×"
            )
        lines.append(
            f"  median ×{c['median_speedup']:.1f} (×{c['median_speedup_vs_reprefill_with_vision']:.1f} if the demo also re-encodes the image)"
        )
    w = s.get("w4")
    if w and "variants" in w:
        lines += ["", f"[W4 vs 16-bit, CPU] {w['quantization']}, {w['decode_tokens']} new tokens, {w['prompt']} prompt",
                  f"  {'variant':12}{'decode tok/s':>14}{'weights MiB':>13}{'decoder MiB':>13}{'cos vs fp32':>13}"]  # fmt: skip
        for name, r in w["variants"].items():
            lines.append(
                f"  {name:12}{r['decode_tokens_per_s']:>14.1f}{r['weights_bytes'] / 2**20:>13.1f}"
                f"{r['decoder_linear_bytes'] / 2**20:>13.1f}{r['logits_cosine_vs_fp32']:>13.4f}"
            )
        for name in ("w4-torch", "w4-dequant"):
            r = w["variants"][name]
            lines.append(
                f"  {name} vs bf16: decode ×{r['decode_speedup_vs_bf16']:.2f}, weights ×{r['memory_ratio_vs_bf16']:.2f} "
                f"(decoder linears ×{r['decoder_memory_ratio_vs_bf16']:.2f})"
            )
    elif w and "skipped" in w:
        lines += ["", f"[W4 vs 16-bit] skipped: {w['skipped']}"]
    sh = s.get("shapes")
    if sh:
        lines += render_shapes(sh)
    st = s.get("startup")
    if st and "ratio" in st:
        lines += [
            "",
            f"[startup] {st['model']}: first prompt after {st['first_prompt_s']:.2f} s; `import torch` alone "
            f"{st['import_torch_s']:.2f} s; ×{st['ratio']:.2f} (target ≤ 1.5; fastest runs ×{st['ratio_of_fastest']:.2f})",
        ]
    g = s.get("gemv")
    if g and "shapes" in g:
        lines += render_gemv(g)
    if s.get("gemv-sweep") and "error" not in s["gemv-sweep"]:
        lines += render_gemv_sweep(s["gemv-sweep"])
    if s.get("dequant-sweep") and "error" not in s["dequant-sweep"]:
        lines += render_dequant_sweep(s["dequant-sweep"])
    if s.get("decode") and "rows" in s["decode"]:
        lines += render_decode(s["decode"])
    for name, sec in s.items():
        if isinstance(sec, dict) and "error" in sec:
            lines += ["", f"[{name}] FAILED: {sec['error']}"]
    lines += ["", f"total {report.get('elapsed_s', 0):.0f} s"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def run(
    device: torch.device,
    plan: bl.Plan,
    sections: tuple[str, ...],
    out: Path | None = None,
    work_dir: Path | None = None,
    time_budget: float | None = None,
    decode_dir: Path | None = None,
) -> dict:
    start = time.perf_counter()
    deadline = start + time_budget if time_budget else None
    report: dict = {"machine": bl.machine_info(device), "plan": bl.plan_dict(plan), "sections": {}}
    sec = report["sections"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="internvl-bench-")
        work_dir = Path(tmp.name)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - start
        if out is not None:  # whole or not at all: a kill mid-write must not leave half a file
            out.parent.mkdir(parents=True, exist_ok=True)
            part = out.with_name(out.name + ".part")
            part.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            os.replace(part, out)

    def rows_done(name: str):
        """Save a long section's rows as they come: scripts/gpu_check.sh kills a step at its timeout,
        and the JSON of the rows measured before that must not be lost with it."""

        def keep(results: dict) -> None:
            sec[name] = results
            report["unfinished_section"] = name
            save()

        return keep

    ckpt: Path | None = None
    tiny_ckpt: Path | None = None
    images: dict[str, Path] = {}

    def small_model() -> Path:
        nonlocal ckpt
        if ckpt is None:
            bl.log("building the benchmark checkpoint ...", start)
            ckpt = bl.build_checkpoint(work_dir / "model", plan)
            images["engine"] = bl.write_test_image(work_dir / "engine.png", *plan.engine_image, seed=1)
            images["chat"] = bl.write_test_image(work_dir / "chat.png", *plan.chat_image, seed=2)
        return ckpt

    def tiny_model() -> Path:  # the QUICK widths: per-token framework overhead dominates
        nonlocal tiny_ckpt
        small_model()
        if tiny_ckpt is None and plan.sizes == bl.QUICK.sizes:
            tiny_ckpt, images["tiny"] = ckpt, images["engine"]
        if tiny_ckpt is None:
            tiny_ckpt = bl.build_checkpoint(work_dir / "tiny", bl.QUICK)
            images["tiny"] = bl.write_test_image(work_dir / "tiny.png", *bl.QUICK.engine_image, seed=3)
        return tiny_ckpt

    overhead_plan = replace(plan, decode_tokens=max(plan.decode_tokens, 64)) if plan is not bl.QUICK else plan
    jobs = {
        "shapes": lambda: section_shapes(plan, device, deadline, start, rows_done("shapes")),
        "gemv": lambda: section_gemv(plan, device, deadline, start, rows_done("gemv")),
        "gemv-sweep": lambda: section_gemv_sweep(plan, device, deadline, start, rows_done("gemv-sweep")),
        "dequant-sweep": lambda: section_dequant_sweep(plan, device, deadline, start, rows_done("dequant-sweep")),
        "engine": lambda: section_engine(small_model(), images["engine"], plan, device, dtype),
        "overhead": lambda: section_engine(tiny_model(), images["tiny"], overhead_plan, device, dtype),
        "load": lambda: section_load(small_model(), plan, device, dtype),
        "chunk": lambda: section_chunk(small_model(), images["chat"], plan, device, dtype),
        "w4": lambda: section_w4(small_model(), plan),
        "decode": lambda: section_decode(plan, decode_dir or work_dir, start),
        "startup": lambda: section_startup(plan),
    }
    failed = []
    try:
        for name in sections:
            if name not in jobs:
                raise SystemExit(f"unknown section {name!r}; choose from {', '.join(jobs)}")
            if deadline is not None and time.perf_counter() > deadline:
                sec[name] = {"skipped": "time budget spent"}
                bl.log(f"{name}: skipped (time budget spent)", start)
                continue
            bl.log(f"{name} ...", start)
            try:
                sec[name] = jobs[name]()
            except Exception as e:
                sec[name] = {"error": repr(e), "traceback": traceback.format_exc(limit=6)}
                failed.append(name)
                bl.log(f"{name}: FAILED {e!r}", start)
            report.pop("unfinished_section", None)
            _free(device)
            save()
    finally:
        report["failed_sections"] = failed
        save()
        if tmp is not None:
            tmp.cleanup()
    return report


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rows(value: str | tuple[int, ...]) -> tuple[int, ...]:
    """--gemv-rows / --sweep-rows: rows M ≥ 1 (argparse reads them; a Namespace built by hand holds the text)."""
    if not isinstance(value, str):
        return tuple(value)
    try:
        return positive_ints(value)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"rows M {e}") from None


def plan_with_overrides(plan: bl.Plan, args: argparse.Namespace) -> bl.Plan:
    """`plan` narrowed by --shape-rows / --gemv-rows / --gemv-columns / --gemv-budget (checked:
    a typo must not cost a GPU call its rows)."""
    changes: dict = {}
    if args.shape_rows:
        rows = []
        for item in _csv(args.shape_rows):
            shape, _, variant = item.partition(":")
            if shape not in bl.LLM_SHAPES and shape not in bl.DRY_SHAPES:
                raise SystemExit(f"--shape-rows: unknown shape {shape!r} (one of {', '.join(bl.LLM_SHAPES)})")
            try:
                variant_backend(variant)
            except ValueError as e:
                raise SystemExit(f"--shape-rows: {e} (w4, w4-<backend> or bf16)") from None
            rows.append((shape, variant))
        changes["cuda_rows"] = tuple(rows)
    if args.gemv_rows:
        changes["gemv_rows"] = _rows(args.gemv_rows)
    if args.gemv_columns:
        columns = tuple(_csv(args.gemv_columns))
        unknown = [c for c in columns if c not in bl.GEMV_VARIANTS]
        if unknown:
            raise SystemExit(f"--gemv-columns: unknown {unknown} (of {', '.join(bl.GEMV_VARIANTS)})")
        changes["gemv_columns"] = columns
    if args.gemv_budget is not None:
        changes["gemv_budget_s"] = args.gemv_budget
    if args.sweep_rows:
        changes["sweep_rows"] = _rows(args.sweep_rows)
    if args.sweep_configs:
        changes["sweep_configs"] = tuple(sweep_config(item) for item in _csv(args.sweep_configs))
    if args.sweep_budget is not None:
        changes["sweep_budget_s"] = args.sweep_budget
    if args.dqsweep_configs:
        changes["dqsweep_configs"] = tuple(dqsweep_config(item) for item in _csv(args.dqsweep_configs))
    if args.dqsweep_budget is not None:
        changes["dqsweep_budget_s"] = args.dqsweep_budget
    return dataclasses.replace(plan, **changes) if changes else plan


def sweep_config(text: str) -> tuple[int, int, int, int]:
    """--sweep-configs item BLOCK_N:BLOCK_K:NUM_WARPS:TARGET_PROGRAMS → a tuple of four positive ints."""
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--sweep-configs: {text!r} is not BLOCK_N:BLOCK_K:NUM_WARPS:TARGET_PROGRAMS (e.g. 64:512:4:528)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def dqsweep_config(text: str) -> tuple[int, int, int]:
    """--dqsweep-configs item BLOCK_N:BLOCK_W:NUM_WARPS → three powers of two (tl.arange's tiles)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 and int(p) & (int(p) - 1) == 0 for p in parts):
        raise SystemExit(f"--dqsweep-configs: {text!r} is not BLOCK_N:BLOCK_W:NUM_WARPS in powers of two (e.g. 16:32:4)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="internvl-chat benchmark")
    p.add_argument("--device", default="cpu", type=torch_device, help="cpu (default) or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="a tiny model and few iterations (smoke test)")
    p.add_argument("--out", type=Path, help="write every number as JSON here")
    p.add_argument("--sections", help="comma-separated subset of " + ",".join(dict.fromkeys(CUDA_SECTIONS + CPU_SECTIONS + OPT_IN_SECTIONS)))
    p.add_argument("--time-budget", type=seconds, help="seconds; later sections are skipped once spent (cuda default 210)")
    p.add_argument("--work-dir", type=Path, help="where to build the benchmark checkpoint (default: a temp folder)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice; the decode section sets its own)")
    p.add_argument("--decode-dir", type=Path, default=bl.REPO_ROOT / ".cache" / "bench-decode",
                   help="where the decode section keeps its 0.5B checkpoint and GGUF files (reused across runs)")
    p.add_argument("--shape-rows", help="shapes section: only these rows, in order, as SHAPE:VARIANT,... "
                   "(e.g. InternVL3-1B:w4,InternVL3-8B:bf16)")
    p.add_argument("--gemv-rows", type=positive_ints, help="gemv section: rows M to time, e.g. 1,16,128")
    p.add_argument("--gemv-columns", help="gemv section: only these columns, e.g. tinygemm,triton,bf16")
    p.add_argument("--gemv-budget", type=seconds, help="gemv section: its own time budget in seconds")
    p.add_argument("--sweep-rows", type=positive_ints, help="gemv-sweep section: rows M to time, e.g. 1,4 (default 1)")
    p.add_argument("--sweep-configs", help="gemv-sweep section: these launch configurations after the default, in order, "
                   "as BLOCK_N:BLOCK_K:NUM_WARPS:TARGET_PROGRAMS,... (e.g. 64:512:4:528,32:256:4:1056)")
    p.add_argument("--sweep-budget", type=seconds, help="gemv-sweep section: its own time budget in seconds (default 100)")
    p.add_argument("--dqsweep-configs", help="dequant-sweep section: these launch configurations after the default, in order, "
                   "as BLOCK_N:BLOCK_W:NUM_WARPS,... (powers of two, e.g. 16:32:4,32:32:8)")
    p.add_argument("--dqsweep-budget", type=seconds, help="dequant-sweep section: its own time budget in seconds (default 60)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA GPU is visible", file=sys.stderr)
        return 2
    plan = plan_with_overrides(bl.QUICK if args.quick else bl.FULL, args)
    if args.sections:
        sections = tuple(dict.fromkeys(SECTION_ALIASES.get(s.strip(), s.strip()) for s in args.sections.split(",") if s.strip()))
    else:
        sections = CUDA_SECTIONS if device.type == "cuda" else CPU_SECTIONS
    budget = args.time_budget if args.time_budget is not None else (210.0 if device.type == "cuda" else None)
    report = run(device, plan, sections, args.out, args.work_dir, budget, args.decode_dir)
    print()
    try:
        print(render(report), flush=True)
    except Exception as e:  # never lose a GPU run's numbers to a formatting bug
        print(f"(could not render the table: {e!r}; raw report follows)")
        print(json.dumps(report, indent=1), flush=True)
    return 1 if report["failed_sections"] else 0


if __name__ == "__main__":
    sys.exit(main())
