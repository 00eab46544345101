"""The benchmark's code on a tiny model: report structure, and the helpers it relies on.

Timings are never asserted (they depend on the machine); what is checked is that the benchmark
measures what it claims: the same weights and prompt on both engines (their greedy tokens agree),
chunk prefilling giving the same next token as re-prefilling, the W4 model being exactly the RTN
model, and the bytes-per-token accounting matching a hand count.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import bench
import bench_lib as bl
from internvl_chat.engine import cpu_features
from internvl_chat.engine.loader import load_model

PLAN = bl.QUICK


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    out = work / "report.json"
    report = bench.run(torch.device("cpu"), PLAN, ("engine", "overhead", "chunk", "w4"), out=out, work_dir=work)
    return report, out, work


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_report_is_written_and_complete(quick_run):
    report, out, _ = quick_run
    assert report["failed_sections"] == []
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    machine = report["machine"]
    for key in ("date_utc", "git_commit", "torch", "transformers", "cpu", "device"):
        assert machine[key]
    assert report["plan"]["name"] == "quick"
    assert set(report["sections"]) == {"engine", "overhead", "chunk", "w4"}
    text = bench.render(report)
    for header in ("[engine vs transformers]", "[chunk prefilling]", "[W4 vs 16-bit, CPU]"):
        assert header in text


@pytest.mark.parametrize("section", ["engine", "overhead"])
def test_engine_section_compares_like_with_like(quick_run, section):
    e = quick_run[0]["sections"][section]
    for side in ("ours", "transformers"):
        for key in ("vision_ms", "ttft_ms", "decode_tokens_per_s"):  # measured durations
            assert _positive(e[side][key]), (side, key)
        assert len(e[side]["decode_runs_tokens_per_s"]) == PLAN.repeats
    # transformers' prefill is derived (TTFT − separately timed vision): a difference of two
    # medians, which a busy machine can make negative; only its being a number is checked
    assert _positive(e["ours"]["prefill_ms"])
    assert isinstance(e["transformers"]["prefill_ms"], float) and math.isfinite(e["transformers"]["prefill_ms"])
    assert e["decode_speedup"] == pytest.approx(e["ours"]["decode_tokens_per_s"] / e["transformers"]["decode_tokens_per_s"])
    assert e["ttft_speedup"] == pytest.approx(e["transformers"]["ttft_ms"] / e["ours"]["ttft_ms"])
    # same weights, same prompt, fp32: greedy decoding must give the same tokens in both engines
    assert e["greedy_tokens_agree"] == f"{PLAN.decode_tokens}/{PLAN.decode_tokens}"
    assert e["image_tiles"] == 1 and e["prompt_tokens"] > 256


def test_chunk_section_measures_the_conversation(quick_run):
    c = quick_run[0]["sections"]["chunk"]
    assert c["image_tiles"] == 3
    assert [t["turn"] for t in c["turns"]] == list(range(2, PLAN.chat_turns + 1))
    for t in c["turns"]:
        assert t["same_first_token"]  # chunk prefilling and re-prefilling agree on the next token
        assert t["history_tokens"] > 3 * 256 > t["chunk_tokens"] > 0
        assert t["speedup"] == pytest.approx(t["reprefill_ttft_ms"] / t["chunk_ttft_ms"])
        assert _positive(t["session_ttft_ms"])
    histories = [t["history_tokens"] for t in c["turns"]]
    assert histories == sorted(histories)


def test_w4_section_replaces_every_decoder_linear(quick_run):
    w = quick_run[0]["sections"]["w4"]
    rows = w["variants"]
    assert set(rows) == {"fp32", "bf16", "w4-torch", "w4-dequant"}
    linears = 4 * PLAN.sizes.text_layers  # fused qkv, o, fused gate_up, down
    assert rows["w4-torch"]["replaced_linears"] == rows["w4-dequant"]["replaced_linears"] == linears
    # (the whole model's bytes may not halve: a CPU without native bf16 keeps the vision tower in fp32)
    assert rows["bf16"]["decoder_linear_bytes"] * 2 == rows["fp32"]["decoder_linear_bytes"]
    assert rows["bf16"]["weights_bytes"] < rows["fp32"]["weights_bytes"]
    for name in ("w4-torch", "w4-dequant"):
        # 4 bits + per-group scale/zero vs 16 bits: about a quarter
        assert 0.2 < rows[name]["decoder_memory_ratio_vs_bf16"] < 0.35
        assert rows[name]["memory_ratio_vs_bf16"] < 1
        assert _positive(rows[name]["decode_tokens_per_s"])


def _rtn_dequantized(weight_out_in: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Round-to-nearest 4-bit per group of `group` inputs (SPEC §2 quantizer), dequantized, [N, K]."""
    w = weight_out_in.float().t()
    k, n = w.shape
    w = w.reshape(k // group, group, n)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-5).half().float()
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    q = (torch.round(w / scale) + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(k, n).t()


def test_quantize_decoder_equals_plain_rtn_model(quick_run):
    ckpt = quick_run[2] / "model"
    w4 = load_model(ckpt, device="cpu", dtype="float32", max_context=256).model
    plain = load_model(ckpt, device="cpu", dtype="float32", max_context=256).model
    assert bl.quantize_decoder_(w4, "dequant") == 4 * PLAN.sizes.text_layers
    with torch.no_grad():
        for _, _, linear in bl.decoder_linears(plain):
            linear.weight.copy_(_rtn_dequantized(linear.weight))
    prompt = list(range(3, 40))
    got, want = w4.forward(prompt, 0, all_logits=True), plain.forward(prompt, 0, all_logits=True)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _tiny_cfg(w4: bool):
    vision = bl.VisionConfig(
        hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
        norm_type="layer_norm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
    )  # fmt: skip
    # hidden 128, 2 layers, 4 heads (head_dim 32), 2 kv heads, FFN 256, vocab 512
    return bl.text_shape_config(128, 2, 4, 2, 256, w4, vision, 512)


def test_bytes_per_token_match_a_hand_count():
    cfg = _tiny_cfg(w4=False)
    model = bl.build_random_model(cfg, torch.device("cpu"), torch.bfloat16, max_seq_len=64)
    h, f, layers, v, kv_heads, hd = 128, 256, 2, 512, 2, 32
    q, kv = 4 * hd, kv_heads * hd
    per_layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h * 2 * f + f * h + 2 * h
    weights = 2 * (layers * per_layer + h + v * h + h)  # + final norm, lm_head, one embedding row
    traffic = bl.decode_bytes_per_token(model, context_len=40)
    assert traffic["weights"] == weights
    # the cache's own element size: fp32 for this small bf16 decoder on a CPU without native bf16
    kv_dtype = cpu_features.kv_cache_dtype(torch.device("cpu"), torch.bfloat16, cpu_features.decoder_weight_bytes(cfg.text))
    assert model.language_model.k_cache[0].dtype == kv_dtype
    assert traffic["kv"] == 2 * layers * kv_heads * hd * 40 * kv_dtype.itemsize
    assert traffic["total"] == traffic["weights"] + traffic["kv"]


def test_random_w4_model_is_filled_and_runs():
    model = bl.build_random_model(_tiny_cfg(w4=True), torch.device("cpu"), torch.bfloat16, max_seq_len=64)
    from internvl_chat.engine.model import PendingInt4
    from internvl_chat.quant import Int4Linear

    assert not any(isinstance(m, PendingInt4) for m in model.modules())
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 4 * 2
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.float().abs().sum() > 0, name
    linear = model.language_model.lm_head.weight.float()
    assert 0.015 < linear.std() < 0.025
    for _, _, layer in bl.decoder_linears(model):  # 4 bits + bf16 scale/zero per group of 128
        assert 0.5 <= (layer.memory_bytes() - (layer.bias.numel() * 2 if layer.bias is not None else 0)) / (
            layer.in_features * layer.out_features
        ) <= 0.56
    logits = model.forward(list(range(10)), 0)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_measure_shape_on_cpu_reports_decode_prefill_and_follow_ups():
    """The GPU check's code path at a tiny W4 shape on CPU: eager and compiled decode, ops counted."""
    out = bench.measure_shape(_tiny_cfg(w4=True), PLAN, torch.device("cpu"), bandwidth=1e10)
    d, p = out["decode"], out["prefill"]
    assert set(d) >= {"eager", "compiled"} and "graphs" not in d  # CUDA graphs are CUDA only
    for mode in ("eager", "compiled"):
        r = d[mode]
        assert _positive(r["tokens_per_s"]) and len(r["runs"]) == PLAN.cuda_repeats, (mode, r)
        assert r["bandwidth_share"] == pytest.approx(r["tokens_per_s"] * d["bytes_per_token"]["total"] / 1e10)
        assert r["ops"]["kind"] == "aten calls" and r["ops_per_layer"] > 0
    assert d["compiled"]["compiled_steps"] > 0 and _positive(d["compiled"]["compile_s"])
    assert d["compiled"]["ops_per_layer"] < d["eager"]["ops_per_layer"]  # fused: fewer calls per layer
    assert p["tokens"] == 24 + 256 * PLAN.cuda_image_tiles + 16
    assert _positive(p["vision_ms"]) and _positive(p["llm_prefill_tokens_per_s"])
    assert set(out["followup_ttft_ms"]) == {str(h) for h in PLAN.cuda_followup_history}
    assert all(_positive(v) for v in out["followup_ttft_ms"].values())


def test_random_awq_tensors_have_the_published_shapes():
    qweight, qzeros, scales = bl.random_awq(256, 64, "cpu")
    assert qweight.shape == (256, 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (2, 8) and qzeros.dtype == torch.int32
    assert scales.shape == (2, 64) and scales.dtype == torch.float16


def test_graph_decode_step_follows_the_eager_greedy_path():
    """The step DecodeGraphs captures (device positions, masked kv bucket) decodes the
    same greedy tokens as plain `forward(token, pos)` steps; checked eagerly on CPU in fp32."""
    cfg = _tiny_cfg(w4=False)
    model = bl.build_random_model(cfg, torch.device("cpu"), torch.float32, max_seq_len=128)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # hotter weights than fill_random_'s, so the greedy tokens vary
        for p in model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5, generator=gen)
    prompt = list(range(5, 30))
    eager = bl.engine_greedy(model, prompt, None, 8)["tokens"]
    with torch.inference_mode():
        first = model.forward(prompt, 0).argmax()
        for cache in model.language_model.k_cache + model.language_model.v_cache:
            cache[:, :, len(prompt) :].normal_(0, 10)  # stale junk beyond the prompt must stay masked
        token, pos = first.reshape(1).clone(), torch.tensor([len(prompt)])
        stepped = [int(first)]
        for _ in range(7):  # what DecodeGraphs captures: device position, fixed masked bucket
            token.copy_(model.language_model.decode_masked(token, pos, 64).argmax().reshape(1))
            pos.add_(1)
            stepped.append(int(token))
    assert stepped == eager
    assert int(pos) == len(prompt) + 7
    assert len(set(eager)) > 1


def test_dense_threshold_is_where_dense_wins_from_then_on():
    def row(pairs):
        return {str(m): {"kernel_ms": k, "dense_ms": d} for m, (k, d) in pairs.items()}

    a = row({1: (0.1, 0.5), 64: (0.4, 0.5), 128: (0.9, 0.6), 256: (1.8, 0.9)})
    b = row({1: (0.1, 0.3), 64: (0.2, 0.1), 128: (0.5, 0.4), 256: (1.0, 0.5)})
    assert bench.dense_from_rows({"a": a, "b": b}) == 128  # a still prefers the kernel at 64
    noisy = row({1: (0.1, 0.05), 64: (0.4, 0.5), 128: (0.9, 0.6)})  # dense "wins" at M=1 by noise only
    assert bench.dense_from_rows({"n": noisy}) == 128
    assert bench.dense_from_rows({"k": row({1: (0.1, 0.2), 64: (0.2, 0.3)})}) is None


def test_cuda_sections_render():
    """The GPU run prints its table last: the shapes / crossover rendering must work (run on CPU)."""
    plan = replace(bl.QUICK, cuda_compiled=False)
    assert bench.shape_rows(plan) == [("tiny", "w4"), ("tiny", "bf16")]
    shapes = bench.section_shapes(plan, torch.device("cpu"), None, 0.0)
    assert set(shapes) == {"copy_bandwidth_bytes_per_s", "bandwidth_ceiling_bytes_per_s", "tiny bf16", "tiny w4"}
    assert _positive(shapes["copy_bandwidth_bytes_per_s"])
    assert all("decode" in shapes[k] for k in ("tiny bf16", "tiny w4")), shapes
    w4, bf16 = shapes["tiny w4"]["decode"], shapes["tiny bf16"]["decode"]
    assert w4["bytes_per_token"]["weights"] < bf16["bytes_per_token"]["weights"]
    crossover = {"table": {"8B qkv": {"1": {"kernel_ms": 0.1, "dense_ms": 0.3}}}, "dense_from_rows": None,
                 "current_dense_threshold": 64}  # fmt: skip
    report = {"machine": bl.machine_info(torch.device("cpu")), "plan": bl.plan_dict(plan),
              "sections": {"shapes": shapes, "crossover": crossover, "engine": {"error": "boom"}}}  # fmt: skip
    text = bench.render(report)
    assert "[InternVL3 shapes" in text and "tiny w4" in text and "M=1: 0.100/0.300" in text
    assert "follow-up = time to first token" in text
    assert "[engine] FAILED: boom" in text


def test_decode_section_times_eager_and_compiled_in_a_fresh_process(tmp_path):
    """The CPU decode section (issue 10) on the demo model: one thread, eager then compiled."""
    d = bench.section_decode(PLAN, tmp_path, 0.0)
    [row] = d["rows"]
    o = row["ours"]
    assert (row["model"], row["dtype"], row["threads"]) == ("demo", "float32", 1)
    assert o["torch_threads"] == 1  # the probe process really ran with the row's thread count
    for key in ("prefill_tokens_per_s", "eager_tokens_per_s", "compiled_tokens_per_s", "compile_s"):
        assert _positive(o[key]), key
    assert o["compiled_steps"] >= PLAN.decode_new  # the compiled rows ran the compiled step
    assert o["bytes_per_token"] > 0
    assert 0 < o["compiled_ops_per_layer"] < o["eager_ops_per_layer"]  # fused: fewer calls per layer
    depth = PLAN.decode_depth("demo", "float32")
    assert depth > 0 and o["depth"] == depth and _positive(o["depth_compiled_tokens_per_s"])  # after a long context too
    text = "\n".join(bench.render_decode(d))
    assert "[CPU decode and prefill vs llama.cpp]" in text and "demo" in text
    assert "decode after a long context" in text and f"{depth:>9}" in text
