"""The fused kernels (engine/fused.py) compiled for an H100/H200 (sm_90) by Triton's real compiler
on this CPU, at the InternVL3 decoders' shapes and with the constants fused.py launches them with:
the interpreter (test_fused.py) checks their values, this checks that the GPU build exists at all,
so the first GPU session does not spend its minutes on a compile error."""

from __future__ import annotations

import pytest

from internvl_chat.engine import fused

pytest.importorskip("triton")

# (hidden, heads, kv_heads, head_dim, intermediate) of InternVL3-1B, 2B and 8B's language models
DECODERS = {"1B": (896, 14, 2, 64, 4864), "2B": (1536, 12, 2, 128, 8960), "8B": (3584, 28, 4, 128, 18944)}
TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(index: int, types: dict[str, str], constants: dict, num_warps: int):
    from triton_sm90 import compile_for_sm90

    return compile_for_sm90(fused._kernels(False)[index], types, constants, num_warps)


def _kernels_at(decoder: str, dtype: str, positions_in_tensor: bool, bias: bool) -> None:
    hidden, heads, kv_heads, head_dim, inter = DECODERS[decoder]
    p = TRITON_TYPES[dtype]
    block = fused._next_power_of_two(hidden)
    for has_res in (True, False):
        _compile(0, dict(x_ptr=p, res_ptr=p, w_ptr=p, out_ptr=p, sum_ptr=p, D="i32", eps="fp32"),
                 dict(HAS_RES=has_res, BLOCK=block, INTERPRETED=False), 8 if block >= 4096 else 4)  # fmt: skip
    _compile(1, dict(gate_up_ptr=p, out_ptr=p, INTER="i32"), dict(BLOCK=fused.SILU_BLOCK), 4)
    _compile(2, dict(qkv_ptr=p, bias_ptr=p, cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64" if positions_in_tensor else p,
                     q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, start="i32", cache_len="i32"),
             dict(HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2, POSITIONS_IN_TENSOR=positions_in_tensor, HAS_BIAS=bias),
             1)  # fmt: skip
    group = heads // kv_heads
    group_pad = max(16, fused._next_power_of_two(group))
    _compile(3, dict(q_ptr=p, k_ptr=p, v_ptr=p, last_ptr="*i64" if positions_in_tensor else p, acc_ptr="*fp32", ml_ptr="*fp32",
                     last_key="i32", cache_len="i32", scale="fp32"),
             dict(GROUP=group, GROUP_PAD=group_pad, HD=head_dim, SPLIT=fused.ATTENTION_SPLIT, BLOCK_N=fused.ATTENTION_BLOCK,
                  LAST_IN_TENSOR=positions_in_tensor, IEEE=dtype == "fp32", INTERPRETED=False), 4)  # fmt: skip
    # the reduce's splits at 16k keys (its SPLITS_PAD grows with the context: the largest the bench asks)
    _compile(4, dict(acc_ptr="*fp32", ml_ptr="*fp32", out_ptr=p, splits="i32"),
             dict(GROUP=group, GROUP_PAD=group_pad, HD=head_dim, SPLITS_PAD=16384 // fused.ATTENTION_SPLIT, INTERPRETED=False), 4)  # fmt: skip


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # Triton 3.9 announcing a default it changes
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_the_fused_kernels_compile_for_an_h100_in_bf16_at_each_decoders_shape(decoder):
    """As the app runs them on a GPU: bf16, positions in a device tensor (graphs) and as an int
    (eager), a 4-bit qkv's bias left to the RoPE kernel and none."""
    _kernels_at(decoder, "bf16", positions_in_tensor=True, bias=True)
    _kernels_at(decoder, "bf16", positions_in_tensor=False, bias=False)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_the_fused_kernels_compile_for_an_h100_in_the_other_dtypes(dtype):
    """--dtype float16 and float32 (the fp32 attention dots in IEEE precision)."""
    _kernels_at("2B", dtype, positions_in_tensor=True, bias=True)
