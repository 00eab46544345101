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
    """The GPU run prints its table last: the shapes / gemv rendering must work (run on CPU)."""
    plan = replace(bl.QUICK, cuda_compiled=False)
    # the most wanted rows first: W4 as the app runs and bf16 of every shape, then the other int4 kernels
    assert bench.shape_rows(plan) == [("tiny", "w4"), ("tiny", "bf16"), ("tiny", "w4-triton"), ("tiny", "w4-gemlite")]
    two = replace(plan, cuda_shapes=("InternVL3-8B", "InternVL3-1B"))
    assert bench.shape_rows(two)[:4] == [("InternVL3-8B", "w4"), ("InternVL3-8B", "bf16"), ("InternVL3-1B", "w4"), ("InternVL3-1B", "bf16")]
    shapes = bench.section_shapes(plan, torch.device("cpu"), None, 0.0)
    assert set(shapes) == {"copy_bandwidth_bytes_per_s", "bandwidth_ceiling_bytes_per_s", "tiny bf16", "tiny w4",
                           "tiny w4-triton", "tiny w4-gemlite"}  # fmt: skip
    assert _positive(shapes["copy_bandwidth_bytes_per_s"])
    assert all("decode" in shapes[k] for k in ("tiny bf16", "tiny w4")), shapes
    for backend in ("triton", "gemlite"):  # measured where the build and device have it, else said why not
        row = shapes[f"tiny w4-{backend}"]
        if bl.int4_backend_unavailable(backend, "cpu") is None:
            assert "decode" in row and row["int4_backend"] == backend, row
        else:
            assert row["skipped"].startswith(f"int4 backend {backend!r} not available: "), row
    w4, bf16 = shapes["tiny w4"]["decode"], shapes["tiny bf16"]["decode"]
    assert w4["bytes_per_token"]["weights"] < bf16["bytes_per_token"]["weights"]
    gemv = bench.section_gemv(plan, torch.device("cpu"), None, 0.0)
    report = {"machine": bl.machine_info(torch.device("cpu")), "plan": bl.plan_dict(plan),
              "sections": {"shapes": shapes, "gemv": gemv, "engine": {"error": "boom"}}}  # fmt: skip
    text = bench.render(report)
    assert "[InternVL3 shapes" in text and "tiny w4" in text
    assert "follow-up = time to first token" in text
    assert "tiny w4 (eager) per step: " in text and " µs ×" in text  # where a step's time goes, by op
    follow = shapes["tiny w4"]["followup_ops"]
    assert follow["per_step"] > 0 and follow["op_us"] > 0 and follow["top"], follow
    top = shapes["tiny w4"]["decode"]["eager"]["ops"]["top"]
    assert top and all(t["calls"] >= 1 and t["us"] >= 0 for t in top) and top[0]["us"] >= top[-1]["us"]
    assert "[int4 linears by rows M]" in text and "tiny gate_up 128→512" in text and "choose per shape" in text
    assert "[engine] FAILED: boom" in text


def test_shapes_render_compares_another_int4_backend_with_tinygemm():
    def row(rates: dict[str, float], share: float) -> dict:
        decode = {m: {"tokens_per_s": v, "bandwidth_share": share * v / max(rates.values()), "ops_per_layer": 1.0}
                  for m, v in rates.items()}  # fmt: skip
        return {"decode": {**decode, "bytes_per_token": {"total": 4e9}}, "prefill": {"ttft_ms": 1.0, "llm_prefill_tokens_per_s": 1.0}}

    sh = {"copy_bandwidth_bytes_per_s": 4e12, "InternVL3-8B w4": row({"eager": 60, "graphs": 200, "compiled": 210}, 0.3),
          "InternVL3-8B w4-triton": row({"eager": 70, "graphs": 400}, 0.6)}  # fmt: skip
    text = "\n".join(bench.render_shapes(sh))
    assert "InternVL3-8B W4 decode: triton 400 tok/s (graphs, 60 % of the copy bandwidth) vs tinygemm 210 tok/s (compiled, 30 %): ×1.90" in text


def test_llm_linear_shapes_are_the_engine_s_fused_linears():
    model = bl.build_random_model(bl.shape_config("tiny", w4=False), torch.device("cpu"), torch.bfloat16, max_seq_len=64)
    layer0 = [(name, m.in_features, m.out_features) for _, name, m in bl.decoder_linears(model)[:4]]
    assert {name: (k, n) for name, k, n in layer0} == {
        ("qkv_proj" if name == "qkv" else f"{name}_proj"): kn for name, kn in bl.llm_linear_shapes("tiny").items()
    }
    assert bl.llm_linear_shapes("InternVL3-8B") == {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888),
                                                    "down": (18944, 3584)}  # fmt: skip


def test_gemv_section_on_cpu_measures_and_checks_every_available_backend():
    """The gemv section's code path at the tiny shape: every column this build has, or why not."""
    g = bench.section_gemv(PLAN, torch.device("cpu"), None, 0.0)
    json.dumps(g)  # the report is JSON
    cols = g["columns"]
    assert set(cols) == set(bl.GEMV_VARIANTS)
    assert cols["tinygemm"]["available"] and cols["bf16"]["available"]
    assert not cols["tinygemm-dense"]["available"]  # CUDA only
    for c in cols.values():
        assert c["available"] == (c["reason"] is None)
    measured = [label for label, c in cols.items() if c["available"]]
    assert set(g["shapes"]) == {f"tiny {name}" for name in ("qkv", "o", "gate_up", "down")}
    for key, r in g["shapes"].items():
        k, n = bl.llm_linear_shapes("tiny")[key.split()[1]]
        assert (r["in_features"], r["out_features"]) == (k, n)
        assert r["bytes"]["bf16"] == 2 * k * n
        assert r["bytes"]["tinygemm"] == k * n // 2 + (k // bl.AWQ_GROUP) * n * 4  # nibbles + bf16 (scale, zero)
        assert list(r["rows"]) == [str(m) for m in PLAN.gemv_rows]
        assert r["timing"] == ["perf_counter"]
        for m, row in r["rows"].items():
            for label in measured:
                cell = row[label]
                assert _positive(cell["us"]) and cell["ok"], (key, m, label, cell)
                nbytes = r["bytes"][label] + int(m) * (k + n) * 2
                assert cell["gb_per_s"] == pytest.approx(nbytes / cell["us"] / 1e3)
                assert cell["bandwidth_share"] == pytest.approx(cell["gb_per_s"] * 1e9 / g["copy_bandwidth_bytes_per_s"])
            assert row["fastest"] in measured and row["fastest"] != "bf16"
            assert row["fastest_vs_bf16"] == pytest.approx(row["bf16"]["us"] / row[row["fastest"]]["us"])
        assert all(r["check"][label]["ok"] for label in measured)
        assert [c["backend"] for c in r["choice"]] and r["choice"][0]["from_rows"] == PLAN.gemv_rows[0]
        assert r["choice"][-1]["to_rows"] == PLAN.gemv_rows[-1]
    assert "dense_from_rows" not in g  # no dense path to compare on the CPU


def test_gemv_check_catches_a_wrong_backend(monkeypatch):
    """A fast kernel with a wrong answer is flagged in the numbers and never chosen."""
    real_build = bl.build_gemv_layer

    def build(label, awq, device, *args, **kwargs):
        if label != "wrong":
            return real_build(label, awq, device, *args, **kwargs)
        qweight, qzeros, scales = awq
        return real_build("tinygemm", (qweight.roll(1, 0), qzeros, scales), device)  # rows of W shifted by one

    monkeypatch.setattr(bl, "build_gemv_layer", build)
    monkeypatch.setitem(bl.GEMV_VARIANTS, "wrong", bl.GemvVariant("torch"))
    r = bl.measure_linear(256, 128, (1, 3), ["tinygemm", "wrong", "bf16"], torch.device("cpu"), 1e10)
    assert r["check"]["tinygemm"]["ok"] and r["check"]["bf16"]["ok"]
    assert not r["check"]["wrong"]["ok"] and r["check"]["wrong"]["max_rel_error"] > 0.3
    for row in r["rows"].values():
        assert row["wrong"]["ok"] is False and row["fastest"] == "tinygemm"  # even if "wrong" timed faster
    r["choice"] = bl.choice_by_rows(r["rows"])
    g = {"copy_bandwidth_bytes_per_s": 1e10, "max_rel_error": bl.GEMV_MAX_REL_ERROR, "shapes": {"x": r},
         "columns": {c: {"available": True, "reason": None} for c in ("tinygemm", "wrong", "bf16")}}  # fmt: skip
    text = "\n".join(bench.render_gemv(g))
    assert "wrong: CHECK FAILED" in text and "%!" in text


def test_int4_backend_availability_is_looked_up_not_assumed(monkeypatch):
    from internvl_chat import quant

    assert bl.int4_backend_unavailable("torch", "cpu") is None
    monkeypatch.setattr(quant, "BACKENDS", tuple(b for b in quant.BACKENDS if b != "fake"))
    assert "not in this build" in bl.int4_backend_unavailable("fake", "cpu")
    monkeypatch.setattr(quant, "BACKENDS", quant.BACKENDS + ("fake",))
    assert "no fake_backend_available()" in bl.int4_backend_unavailable("fake", "cpu")
    monkeypatch.setattr(quant, "fake_backend_available", lambda device: device.type == "cuda", raising=False)
    assert bl.int4_backend_unavailable("fake", "cpu") == "fake_backend_available(cpu) is false"
    assert bl.int4_backend_unavailable("fake", "cuda") is None
    monkeypatch.setattr(quant, "fake_backend_available", lambda device: 1 / 0)
    assert "failed: ZeroDivisionError" in bl.int4_backend_unavailable("fake", "cpu")
    assert bench.variant_backend("w4") == (True, "auto") and bench.variant_backend("w4-fake") == (True, "fake")
    assert bench.variant_backend("bf16") == (False, "auto")


def test_rotation_copies_and_timing_on_cpu():
    layer = bl.build_gemv_layer("bf16", bl.random_awq(256, 128, "cpu"), torch.device("cpu"))
    assert bl.rotation_copies(layer, torch.device("cpu")) == [layer]  # no cache to defeat by default
    copies = bl.rotation_copies(layer, torch.device("cpu"), cache_bytes=4 * bl.module_bytes(layer))
    assert len(copies) == 8 and copies[0] is layer
    assert copies[1].weight.data_ptr() != layer.weight.data_ptr() and torch.equal(copies[1].weight, layer.weight)
    calls = []
    t = bl.time_per_call([lambda: calls.append(1)] * 2, torch.device("cpu"), reps=3)
    assert t["method"] == "perf_counter" and _positive(t["s"]) and len(calls) == 2 + 2 + 3 * t["calls_per_run"]


def test_dense_from_rows_uses_rows_every_shape_has():
    full = {str(m): {"kernel_ms": 1.0, "dense_ms": 2.0 if m < 128 else 0.5} for m in (1, 64, 128, 256)}
    cut = {m: v for m, v in full.items() if m != "256"}  # a shape whose last row ran out of time
    assert bench.dense_from_rows({"a": full, "b": cut}) == 128
    assert bench.dense_from_rows({}) is None


def test_kernel_vs_dense_reads_the_gemv_table_with_rows_and_shapes_left_out():
    def cell(us):
        return {"us": us, "ok": True}

    shapes = {
        "8B qkv": {"rows": {"1": {"tinygemm": cell(10.0), "tinygemm-dense": cell(50.0)},
                            "256": {"tinygemm": cell(900.0), "tinygemm-dense": cell(300.0)},
                            "512": {"skipped": "time budget spent"}}},
        "8B o": {"rows": {"1": {"tinygemm": cell(8.0), "tinygemm-dense": {"error": "boom"}}}},
        "8B down": {"skipped": "time budget spent"},
    }  # fmt: skip
    table = bench.kernel_vs_dense(shapes)
    assert table == {"8B qkv": {"1": {"kernel_ms": 0.01, "dense_ms": 0.05}, "256": {"kernel_ms": 0.9, "dense_ms": 0.3}}}
    assert bench.dense_from_rows(table) == 256


def test_gemv_rows_past_the_deadline_are_skipped():
    r = bl.measure_linear(256, 128, (1, 2), ["tinygemm"], torch.device("cpu"), 1e10, deadline=0.0)
    assert r["rows"] == {"1": {"skipped": "time budget spent"}, "2": {"skipped": "time budget spent"}}
    assert r["check"]["tinygemm"] == {"max_rel_error": None, "ok": None, "limit": bl.GEMV_MAX_REL_ERROR}  # not checked
    assert bl.choice_by_rows(r["rows"]) == []
    g = {"copy_bandwidth_bytes_per_s": 1e10, "max_rel_error": bl.GEMV_MAX_REL_ERROR, "shapes": {"x": r},
         "columns": {"tinygemm": {"available": True, "reason": None}}}  # fmt: skip
    text = "\n".join(bench.render_gemv(g))
    assert "time budget spent" in text and "CHECK FAILED" not in text


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The triton backend on CPU tensors, in Triton's interpreter (skipped where Triton is missing)."""
    from internvl_chat.quant import triton_gemv

    if triton_gemv._import_failure() is not None:
        pytest.skip(f"the triton backend cannot run here: {triton_gemv._import_failure()}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return triton_gemv


def _gemv_constants(triton_gemv) -> tuple:
    return triton_gemv.BLOCK_N, triton_gemv.BLOCK_K, triton_gemv.NUM_WARPS, triton_gemv.TARGET_PROGRAMS, triton_gemv.REDUCE_BLOCK


def test_gemv_sweep_times_and_checks_every_configuration_and_records_one_it_cannot_run(triton_interpreter):
    """The gemv-sweep section at the tiny shape: the default configuration first, each other one
    timed and checked, one the kernel refuses (BLOCK_N not a power of two) recorded as failed with
    its reason; the module's constants untouched."""
    tg = triton_interpreter
    before = _gemv_constants(tg)
    plan = replace(PLAN, sweep_configs=PLAN.sweep_configs + ((96, 256, 4, 528), tg.default_config()))  # default: once
    w = bench.section_gemv_sweep(plan, torch.device("cpu"), None, 0.0)
    assert _gemv_constants(tg) == before
    json.dumps(w)  # the report is JSON
    default = "n64 k256 w4 p528"
    assert w["default_config"] == default == bl.sweep_label(tg.default_config())
    assert list(w["configs"]) == [default, "n32 k128 w2 p1056", "n128 k512 w8 p264", "n96 k256 w4 p528"]
    assert w["configs"]["n32 k128 w2 p1056"] == {"block_n": 32, "block_k": 128, "num_warps": 2, "target_programs": 1056}
    assert set(w["shapes"]) == {f"tiny {name}" for name in ("qkv", "o", "gate_up", "down")}
    splits = set()
    for key, r in w["shapes"].items():
        k, n = bl.llm_linear_shapes("tiny")[key.split()[1]]
        assert (r["in_features"], r["out_features"]) == (k, n)
        assert r["bytes"] == k * n // 2 + (k // bl.AWQ_GROUP) * n * 3  # nibbles, fp16 scales, uint8 zeros
        assert r["tinygemm"]["1"]["ok"]
        assert list(r["configs"]) == list(w["configs"])
        for label, cells in r["configs"].items():
            cell = cells["1"]
            if label == "n96 k256 w4 p528":
                assert "us" not in cell and "power of 2" in cell["error"] and "\n" not in cell["error"]
                continue
            config = tg.GemvConfig(**w["configs"][label])
            assert tuple(cell["launch"].values())[:4] == tg.launch_config(k, n, bl.AWQ_GROUP, config)
            assert cell["ok"] and cell["rel_error"] <= bl.GEMV_MAX_REL_ERROR, (key, label, cell)
            assert _positive(cell["us"])
            nbytes = r["bytes"] + (k + n) * 2
            assert cell["gb_per_s"] == pytest.approx(nbytes / cell["us"] / 1e3)
            assert cell["bandwidth_share"] == pytest.approx(cell["gb_per_s"] * 1e9 / w["copy_bandwidth_bytes_per_s"])
            splits.add(cell["launch"]["splits"])
        best = r["best"]["1"]
        assert best["config"] != "n96 k256 w4 p528"
        assert best["us"] == min(c["1"]["us"] for c in r["configs"].values() if "us" in c["1"])
        assert best["vs_default"] == pytest.approx(r["configs"][default]["1"]["us"] / best["us"])
        assert best["vs_tinygemm"] == pytest.approx(r["tinygemm"]["1"]["us"] / best["us"])
    assert splits == {1, 2}  # with and without a K split (and its reduction kernel)
    overall = w["best_overall"]["1"]
    totals = {label: sum(r["configs"][label]["1"]["us"] for r in w["shapes"].values()) for label in list(w["configs"])[:3]}
    assert overall["config"] == min(totals, key=totals.get) and overall["default_total_us"] == pytest.approx(totals[default])
    text = "\n".join(bench.render_gemv_sweep(w))
    assert "[triton GEMV launch configurations] tiny" in text and "tinygemm" in text and "*" in text
    assert "n96 k256 w4 p528 failed (qkv M=1, o M=1, gate_up M=1, down M=1): " in text and "power of 2" in text
    assert f"all       {overall['config']}" in text


def test_gemv_sweep_check_catches_a_wrong_configuration(triton_interpreter, monkeypatch):
    """A configuration that computes a wrong answer fails its check and is never the best."""
    tg = triton_interpreter
    shape, record = bl.prepare_sweep_shape(256, 128, (1,), torch.device("cpu"), 1e10)
    default, other = tg.default_config(), tg.GemvConfig(32, 128, 2, 1056)
    record["configs"]["default"] = {"1": bl.measure_gemv_config(shape, default, 1, torch.device("cpu"), 1e10)}
    real = tg.gemv_with_config

    def wrong_for_other(x2, qweight, scales, zeros, bias, group_size, config):
        y = real(x2, qweight, scales, zeros, bias, group_size, config)
        return y.roll(1, -1) if config == other else y  # outputs shifted by one

    monkeypatch.setattr(tg, "gemv_with_config", wrong_for_other)
    record["configs"]["other"] = {"1": bl.measure_gemv_config(shape, other, 1, torch.device("cpu"), 1e10)}
    assert record["configs"]["default"]["1"]["ok"]
    assert record["configs"]["other"]["1"]["ok"] is False and record["configs"]["other"]["1"]["rel_error"] > 0.3
    assert bl.best_config(record, 1, "default")["config"] == "default"  # even if "other" timed faster


def test_gemv_sweep_past_its_budget_and_without_the_backend(triton_interpreter, monkeypatch):
    tg = triton_interpreter
    w = bench.section_gemv_sweep(replace(PLAN, sweep_budget_s=0.0), torch.device("cpu"), None, 0.0)
    for r in w["shapes"].values():
        assert all(cells == {"1": {"skipped": "time budget spent"}} for cells in r["configs"].values())
        assert r["best"] == {"1": None}
    assert w["best_overall"] == {"1": None}
    text = "\n".join(bench.render_gemv_sweep(w))
    assert "none passed" in text and "failed" not in text
    monkeypatch.delenv("TRITON_INTERPRET")
    w = bench.section_gemv_sweep(PLAN, torch.device("cpu"), None, 0.0)
    assert "TRITON_INTERPRET=1" in w["skipped"]
    assert "[triton GEMV launch configurations] skipped: the triton backend cannot run here" in "\n".join(bench.render_gemv_sweep(w))
    assert tg.launch_config(3584, 4608, 128) == tg.launch_config(3584, 4608, 128, tg.default_config())


def test_sweep_options_are_checked():
    args = bench.argparse.Namespace(shape_rows=None, gemv_rows=None, gemv_columns=None, gemv_budget=None,
                                    sweep_rows="1,4", sweep_configs="64:512:4:528, 32:256:2:1056", sweep_budget=30.0,
                                    dqsweep_configs=None, dqsweep_budget=None)  # fmt: skip
    plan = bench.plan_with_overrides(PLAN, args)
    assert (plan.sweep_rows, plan.sweep_configs, plan.sweep_budget_s) == ((1, 4), ((64, 512, 4, 528), (32, 256, 2, 1056)), 30.0)
    for bad in ("64:512:4", "64:512:4:x", "64:0:4:528"):
        with pytest.raises(SystemExit, match="is not BLOCK_N:BLOCK_K:NUM_WARPS:TARGET_PROGRAMS"):
            bench.plan_with_overrides(PLAN, replace_args(args, sweep_configs=bad))
    assert "gemv-sweep" not in bench.CUDA_SECTIONS + bench.CPU_SECTIONS  # named by --sections only


def replace_args(args, **changes):
    return bench.argparse.Namespace(**{**vars(args), **changes})


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


def test_crossover_is_the_gemv_section_by_its_former_name(tmp_path, capsys):
    out = tmp_path / "gemv.json"
    assert bench.main(["--quick", "--sections", "crossover,gemv", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["gemv"] and "tiny qkv" in report["sections"]["gemv"]["shapes"]
    assert "[int4 linears by rows M]" in capsys.readouterr().out


class _Killed(BaseException):
    """What a timeout's kill is to the section: it gets no chance to return its rows."""


@pytest.mark.parametrize("section", ["gemv", "shapes"])
def test_a_long_section_s_rows_are_saved_as_they_are_measured(tmp_path, monkeypatch, section):
    # scripts/gpu_check.sh kills a bench step at its timeout: the rows measured before must be on disk
    out = tmp_path / "report.json"
    name = "measure_linear" if section == "gemv" else "measure_shape"
    owner = bl if section == "gemv" else bench
    measure, seen = getattr(owner, name), []

    def second_is_killed(*args, **kwargs):
        if seen:
            seen.append(json.loads(out.read_text(encoding="utf-8")))
            raise _Killed
        seen.append(None)
        return measure(*args, **kwargs)

    monkeypatch.setattr(owner, name, second_is_killed)
    plan = replace(PLAN, cuda_compiled=False)
    with pytest.raises(_Killed):
        bench.run(torch.device("cpu"), plan, (section,), out=out, work_dir=tmp_path)
    on_disk = seen[1]
    assert on_disk["unfinished_section"] == section
    rows = on_disk["sections"][section]
    rows = rows["shapes"] if section == "gemv" else rows
    done = [key for key, row in rows.items() if isinstance(row, dict) and "skipped" not in row]
    assert len(done) == 1 and "error" not in rows[done[0]], rows
    assert not list(tmp_path.glob("*.part"))


def test_a_compiled_step_that_falls_back_during_the_runs_is_no_compiled_number(monkeypatch, capfd):
    # the step compiled, then failed at its first call and left the eager step in place (one
    # note): the row measured eager decoding, which must not be reported as the compiled mode's
    from internvl_chat.engine import compiled as compiled_module

    def failing(token, pos):
        raise ValueError("a kernel failed")

    def compile_then_fail(self):
        self.native, self.active = failing, True  # as a successful compile() leaves it
        return True

    monkeypatch.setattr(compiled_module.CompiledStep, "compile", compile_then_fail)
    model = bl.build_random_model(_tiny_cfg(w4=False), torch.device("cpu"), torch.float32, max_seq_len=64)
    first = torch.tensor([7])
    with pytest.raises(RuntimeError, match="^the compiled step fell back to the eager one: ValueError: a kernel failed"):
        bl.engine_decode(model, first, 5, 4, 1, graphs=False, compiled=True)
    assert "using the eager step" in capfd.readouterr().err
    assert model.compiled_step is None  # the engine is eager again for the next mode


def test_every_dequant_sweep_configuration_gives_the_default_bits(triton_interpreter):
    """Each launch configuration of the dequant-sweep list, on both kernels, writes exactly the
    default configuration's dense weight: a tile past N and K, fewer words than a group."""
    from internvl_chat.quant import triton_dequant as td

    inputs = bl.random_dequant_inputs(256, 40, torch.device("cpu"), seed=5)
    configs = [td.DequantConfig(*t) for t in bl.DEQUANT_SWEEP_CONFIGS + bl.QUICK.dqsweep_configs]
    assert td.default_config() not in configs and len(set(configs)) == len(configs) >= 12
    for kernel, tensors in inputs.items():
        default = bl.dequantize_with_config(kernel, tensors, bl.AWQ_GROUP, torch.bfloat16, td.default_config())
        assert default.shape == (40, 256) and default.dtype == torch.bfloat16 and default.abs().max() > 0
        for config in configs:
            got = bl.dequantize_with_config(kernel, tensors, bl.AWQ_GROUP, torch.bfloat16, config)
            assert bl.same_bits(got, default), (kernel, config)
    assert not bl.same_bits(default, default.roll(1, -1)) and not bl.same_bits(default, default.half())


def _dequant_constants(td) -> tuple:
    return td.BLOCK_N, td.BLOCK_W, td.NUM_WARPS


def test_dequant_sweep_times_every_configuration_and_flags_a_wrong_one(triton_interpreter, monkeypatch):
    """The dequant-sweep section at the tiny shape: the default first, each other configuration
    timed on both kernels with its launch and bytes; one whose output is off by a rotation (a
    broken launcher, as a faulty kernel would be) marked wrong and never the best; one the kernel
    cannot run (BLOCK_N not a power of two) recorded as failed with its reason; the module's
    constants untouched."""
    from internvl_chat.quant import triton_dequant as td

    before = _dequant_constants(td)
    broken = td.DequantConfig(128, 64, 8)
    real = td.dequantize_repacked_with_config

    def wrong_for_broken(qweight, scales, zeros, group_size, dtype, config):
        out = real(qweight, scales, zeros, group_size, dtype, config)
        return out.roll(1, -1) if config == broken else out

    monkeypatch.setattr(td, "dequantize_repacked_with_config", wrong_for_broken)
    plan = replace(PLAN, dqsweep_configs=(tuple(broken), (24, 32, 4), tuple(td.default_config())))  # default: once
    w = bench.section_dequant_sweep(plan, torch.device("cpu"), None, 0.0)
    assert _dequant_constants(td) == before
    json.dumps(w)  # the report is JSON
    default = "n32 w32 nw4"
    assert w["default_config"] == default == bl.dequant_label(td.default_config())
    assert list(w["configs"]) == [default, "n128 w64 nw8", "n24 w32 nw4"]
    assert w["configs"]["n128 w64 nw8"] == {"block_n": 128, "block_w": 64, "num_warps": 8}
    assert w["kernels"] == ["tinygemm", "repacked"] and w["group_size"] == bl.AWQ_GROUP
    assert set(w["shapes"]) == {f"tiny {name}" for name in ("qkv", "o", "gate_up", "down")}
    for key, r in w["shapes"].items():
        k, n = bl.llm_linear_shapes("tiny")[key.split()[1]]
        assert (r["in_features"], r["out_features"]) == (k, n)
        packed = {"tinygemm": k * n // 2 + (k // bl.AWQ_GROUP) * n * 4, "repacked": k * n // 2 + (k // bl.AWQ_GROUP) * n * 3}
        for kernel, kr in r["kernels"].items():
            assert (kr["read_bytes"], kr["written_bytes"], kr["bytes"]) == (packed[kernel], k * n * 2, packed[kernel] + k * n * 2)
            assert list(kr["configs"]) == list(w["configs"])
            for label, cell in kr["configs"].items():
                if label == "n24 w32 nw4":
                    assert "us" not in cell and "power of 2" in cell["error"] and "\n" not in cell["error"]
                    continue
                config = td.DequantConfig(**w["configs"][label])
                assert cell["launch"] == bl.dequant_launch(kernel, k, n, bl.AWQ_GROUP, config)
                assert _positive(cell["us"]) and _positive(cell["launch"]["programs"])
                assert cell["gb_per_s"] == pytest.approx(kr["bytes"] / cell["us"] / 1e3)
                assert cell["bandwidth_share"] == pytest.approx(cell["gb_per_s"] * 1e9 / w["copy_bandwidth_bytes_per_s"])
                wrong = kernel == "repacked" and label == "n128 w64 nw8"
                assert cell["ok"] is cell["exact"] is (not wrong), (key, kernel, label)
                assert ("mismatches" in cell) is wrong and cell.get("mismatches", 1) > 0
            best = kr["best"]
            assert best["config"] == (default if kernel == "repacked" else min(
                (c["us"], lb) for lb, c in kr["configs"].items() if "us" in c)[1])  # fmt: skip
            assert best["vs_default"] == pytest.approx(kr["configs"][default]["us"] / best["us"])
    assert w["best_overall"]["repacked"]["config"] == default
    assert w["best_overall"]["repacked"]["vs_default"] == pytest.approx(1.0)
    totals = {lb: sum(r["kernels"]["tinygemm"]["configs"][lb]["us"] for r in w["shapes"].values()) for lb in list(w["configs"])[:2]}
    assert w["best_overall"]["tinygemm"]["config"] == min(totals, key=totals.get)
    assert w["best_overall"]["tinygemm"]["default_total_us"] == pytest.approx(totals[default])
    text = "\n".join(bench.render_dequant_sweep(w))
    assert "[dequantization launch configurations] tiny" in text and "*" in text and "!" in text
    assert "qkv       n128 w64 nw8      WRONG: " in text and "weights differ from the default" in text
    assert "n24 w32 nw4 failed (tinygemm qkv, tinygemm o, tinygemm gate_up, tinygemm down, repacked qkv" in text
    assert f"all       {w['best_overall']['repacked']['config']}" in text


def test_dequant_sweep_past_its_budget_and_without_triton(triton_interpreter, monkeypatch):
    w = bench.section_dequant_sweep(replace(PLAN, dqsweep_budget_s=0.0, dqsweep_configs=()), torch.device("cpu"), None, 0.0)
    for r in w["shapes"].values():
        for kr in r["kernels"].values():
            assert kr["configs"] == {"n32 w32 nw4": {"skipped": "time budget spent"}} and kr["best"] is None
    assert w["best_overall"] == {"tinygemm": None, "repacked": None}
    text = "\n".join(bench.render_dequant_sweep(w))
    assert "none passed" in text and "failed" not in text
    monkeypatch.delenv("TRITON_INTERPRET")
    w = bench.section_dequant_sweep(PLAN, torch.device("cpu"), None, 0.0)
    assert "TRITON_INTERPRET=1" in w["skipped"]
    text = "\n".join(bench.render_dequant_sweep(w))
    assert "[dequantization launch configurations] skipped: the Triton kernels cannot run here" in text


def test_dequant_sweep_options_are_checked():
    args = bench.argparse.Namespace(shape_rows=None, gemv_rows=None, gemv_columns=None, gemv_budget=None, sweep_rows=None,
                                    sweep_configs=None, sweep_budget=None, dqsweep_configs="16:32:4, 32:32:8",
                                    dqsweep_budget=45.0)  # fmt: skip
    plan = bench.plan_with_overrides(PLAN, args)
    assert (plan.dqsweep_configs, plan.dqsweep_budget_s) == (((16, 32, 4), (32, 32, 8)), 45.0)
    for bad in ("16:32", "16:32:x", "16:0:4", "24:32:4"):
        with pytest.raises(SystemExit, match="is not BLOCK_N:BLOCK_W:NUM_WARPS in powers of two"):
            bench.plan_with_overrides(PLAN, replace_args(args, dqsweep_configs=bad))
    assert "dequant-sweep" in bench.OPT_IN_SECTIONS and "dequant-sweep" not in bench.CUDA_SECTIONS + bench.CPU_SECTIONS
