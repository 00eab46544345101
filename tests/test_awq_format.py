"""AWQ GEMM packing, dequantization, the RTN quantizer and TinyChat v2 import.

Every check compares against values written out by hand or against a deliberately plain
element-by-element implementation written here, never against the code under test.
"""

from __future__ import annotations

import pytest
import torch

from internvl_chat.errors import CheckpointError
from internvl_chat.quant.awq_format import (
    awq_to_tinychat_v2,
    concat_awq,
    dequantize_awq,
    pack_awq,
    quantize_rtn,
    tinychat_v2_to_awq,
    unpack_awq,
    validate_awq,
)
from awq_helpers import random_awq

# SPEC §2: nibble slot s of int32 column j holds output column 8j + ORDER[s].
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ---------------------------------------------------------------------------------------------
# Plain reference implementations (Python ints, one element at a time)


def ref_unpack(packed: torch.Tensor) -> torch.Tensor:
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    for r in range(rows):
        for j in range(words):
            word = int(packed[r, j]) & 0xFFFFFFFF
            for s in range(8):
                out[r, 8 * j + ORDER[s]] = (word >> (4 * s)) & 0xF
    return out


def ref_pack(q: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for j in range(cols // 8):
            word = 0
            for s in range(8):
                word |= int(q[r, 8 * j + ORDER[s]]) << (4 * s)
            out[r, j] = word - (1 << 32) if word >= (1 << 31) else word
    return out


def ref_dequant(qweight, qzeros, scales, group_size):
    q = ref_unpack(qweight).double()
    z = ref_unpack(qzeros).double()
    s = scales.double()
    k = torch.arange(q.shape[0]) // group_size
    return (q - z[k]) * s[k]


# ---------------------------------------------------------------------------------------------
# Pack / unpack / dequantize


def test_unpack_hand_values():
    # 0x76543210: slot s holds s, so column ORDER[s] gets s.
    # 0xFEDCBA98 (negative as int32): slot s holds 8 + s.
    packed = torch.tensor([[0x76543210, 0xFEDCBA98 - (1 << 32)]], dtype=torch.int32)
    expected = [[0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]]
    assert unpack_awq(packed).tolist() == expected
    assert unpack_awq(packed).dtype == torch.int32


def test_unpack_matches_bitwise_reference():
    packed = torch.randint(-(2**31), 2**31 - 1, (6, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_awq(packed).long(), ref_unpack(packed))


def test_pack_matches_reference_and_round_trips():
    q = torch.randint(0, 16, (7, 32), generator=torch.Generator().manual_seed(2))
    packed = pack_awq(q)
    assert packed.dtype == torch.int32 and packed.shape == (7, 4)
    assert torch.equal(packed, ref_pack(q))
    big = torch.randint(0, 16, (300, 256), dtype=torch.uint8)
    assert torch.equal(unpack_awq(pack_awq(big), torch.uint8), big)


def test_dequantize_hand_example():
    qweight = torch.tensor([[0x76543210], [0xFEDCBA98 - (1 << 32)]], dtype=torch.int32)
    # one group of 2 rows; zeros: column 0 → 1 (slot 0), column 2 → 2 (slot 1), others 0
    qzeros = torch.tensor([[0x00000021]], dtype=torch.int32)
    scales = torch.tensor([[0.5, 1, 2, 0.25, 1, 1, 1, 1]], dtype=torch.float16)
    w = dequantize_awq(qweight, qzeros, scales, group_size=2)
    assert w.dtype == torch.float32 and w.shape == (2, 8)
    assert w.tolist() == [
        [-0.5, 4.0, -2.0, 1.25, 2.0, 6.0, 3.0, 7.0],
        [3.5, 12.0, 14.0, 3.25, 10.0, 14.0, 11.0, 15.0],
    ]


def test_dequantize_matches_reference_on_random_tensors():
    qweight, qzeros, scales = random_awq(256, 48, group_size=64, seed=3)
    w = dequantize_awq(qweight, qzeros, scales, group_size=64)
    assert torch.equal(w.double(), ref_dequant(qweight, qzeros, scales, 64))
    assert dequantize_awq(qweight, qzeros, scales, 64, dtype=torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Quantizer


def test_quantize_rtn_hand_example():
    w = torch.zeros(4, 8)
    w[:, 0] = torch.tensor([-1.0, 0.1, 1.3, 2.75])  # scale 0.25, zero 4, q 0 4 9 15
    # column 1 all zero: scale clamps to 1e-5, zero 0, q 0
    w[:, 2] = torch.tensor([0.0, 0.5, 1.0, 1.5])  # scale 0.1, zero 0, q 0 5 10 15
    w[:, 3] = torch.tensor([-3.0, -1.5, -0.75, -1.5])  # scale 0.15, zero 20 → clamps to 15, q 0 5 10 5
    for c in range(4, 8):
        w[:, c] = torch.tensor([-2.0, 0.2, 2.6, 5.5])  # scale 0.5, zero 4, q 0 4 9 15
    qweight, qzeros, scales = quantize_rtn(w, group_size=4)
    assert qweight.shape == (4, 1) and qzeros.shape == (1, 1) and scales.shape == (1, 8)
    assert scales.dtype == torch.float16
    expected_scales = torch.tensor([0.25, 1e-5, 0.1, 0.15, 0.5, 0.5, 0.5, 0.5]).half()
    assert torch.equal(scales[0], expected_scales)
    assert ref_unpack(qzeros).tolist() == [[4, 0, 0, 15, 4, 4, 4, 4]]
    q = ref_unpack(qweight)
    assert q[:, 0].tolist() == [0, 4, 9, 15]
    assert q[:, 1].tolist() == [0, 0, 0, 0]
    assert q[:, 2].tolist() == [0, 5, 10, 15]
    assert q[:, 3].tolist() == [0, 5, 10, 5]
    for c in range(4, 8):
        assert q[:, c].tolist() == [0, 4, 9, 15]


def test_quantize_rtn_error_is_at_most_half_a_step():
    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(4))
    qweight, qzeros, scales = quantize_rtn(w, group_size=128)
    deq = ref_dequant(qweight, qzeros, scales, 128)
    step = scales.double().repeat_interleave(128, dim=0)
    assert ((deq - w.double()).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all()


def test_quantize_rtn_clip_override():
    w = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))
    groups = w.reshape(2, 128, 16)
    # Passing the true max/min is the same as passing nothing.
    same = quantize_rtn(w, 128, clip_max=groups.amax(1), clip_min=groups.amin(1))
    for a, b in zip(same, quantize_rtn(w, 128)):
        assert torch.equal(a, b)
    # A tighter range gives scale = (max − min) / 15 and clamps the outliers.
    clip_max, clip_min = groups.amax(1) * 0.5, groups.amin(1) * 0.5
    qweight, qzeros, scales = quantize_rtn(w, 128, clip_max=clip_max, clip_min=clip_min)
    assert torch.allclose(scales.float(), (clip_max - clip_min) / 15, rtol=1e-3)
    deq = ref_dequant(qweight, qzeros, scales, 128)
    assert deq.max() <= clip_max.max() + scales.max() and deq.min() >= clip_min.min() - scales.max()


# ---------------------------------------------------------------------------------------------
# Validation and fusion


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda t: (t[0].long(), t[1], t[2]), "qweight must be int32"),
        (lambda t: (t[0], t[1].float(), t[2]), "qzeros must be int32"),
        (lambda t: (t[0], t[1][:1], t[2]), "qzeros has shape"),
        (lambda t: (t[0], t[1], t[2][:, :8]), "scales has shape"),
        (lambda t: (t[0], t[1], t[2].t()), "scales has shape"),
        (lambda t: (t[0], t[1], t[2].to(torch.int32)), "scales must be a float"),
        (lambda t: (t[0][:200], t[1], t[2]), "not divisible by group size"),
        (lambda t: (t[0][0], t[1], t[2]), "2-D"),
        # a transposed qweight [N/8, K] was told to check group_size, which was right
        (lambda t: (t[0].t().contiguous(), t[1], t[2]), "qweight has shape (2, 256), out/8 × in for the 16 outputs"),
        (lambda t: (t[0].t().contiguous(), t[1], t[2]), "stored transposed, not in AWQ's GEMM layout"),
        # packed along the input (in/8 × out), as GPTQ packs: group_size advice too
        (lambda t: (torch.zeros(32, 16, dtype=torch.int32), t[1], t[2]), "packed along its input (GPTQ's layout)"),
    ],
)
def test_validate_awq_errors(change, fragment):
    qweight, qzeros, scales = change(random_awq(256, 16, 128))
    with pytest.raises(CheckpointError) as info:
        validate_awq(qweight, qzeros, scales, 128, name="layers.0.mlp.up_proj")
    message = str(info.value)
    assert fragment in message and "\n" not in message and "layers.0.mlp.up_proj" in message
    with pytest.raises(CheckpointError):
        dequantize_awq(qweight, qzeros, scales, 128)


def test_validate_awq_returns_shape():
    assert validate_awq(*random_awq(256, 16, 128), 128) == (256, 16)


def test_concat_awq_fuses_along_outputs():
    parts = [random_awq(256, n, 128, seed=10 + i) for i, n in enumerate((16, 8, 24))]
    fused = concat_awq(parts)
    assert fused[0].shape == (256, 6) and fused[1].shape == (2, 6) and fused[2].shape == (2, 48)
    expected = torch.cat([ref_dequant(*p, 128) for p in parts], dim=1)
    assert torch.equal(ref_dequant(*fused, 128), expected)
    with pytest.raises(CheckpointError):
        concat_awq([parts[0], random_awq(128, 16, 128)])
    with pytest.raises(CheckpointError):
        concat_awq([])


# ---------------------------------------------------------------------------------------------
# TinyChat v2

# Steps (1) and (2) of the v2 packing, written out by hand: inside every 32 input columns,
# (1) 0,1,8,9,16,17,24,25, 2,3,10,11,18,19,26,27, 4,5,12,13,20,21,28,29, 6,7,14,15,22,23,30,31
# (2) then inside every 8 take positions 0,2,4,6,1,3,5,7 of that sequence:
V2_WITHIN_32 = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
                4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]  # fmt: skip


def test_v2_within_32_order_follows_the_two_steps():
    step1 = [a * 8 + b * 2 + c for b in range(4) for a in range(4) for c in range(2)]
    assert step1[:10] == [0, 1, 8, 9, 16, 17, 24, 25, 2, 3]
    step2 = [step1[8 * blk + p] for blk in range(4) for p in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert step2 == V2_WITHIN_32


def ref_pack_v2(q_out_in: torch.Tensor) -> torch.Tensor:
    """Element by element, from llm-awq's `pack_intweight` (interleave 4, kstride 64).

    (3) output rows in blocks of 4, input in blocks of 64; (4) each 4×64 block, read row-major
    after steps (1)-(2), is cut into 64 int16 words of 4 consecutive nibbles (first at bits 0-3):
    word i holds row i // 16, permuted positions 4·(i % 16) .. +3.
    """
    n_out, n_in = q_out_in.shape
    out = torch.zeros(n_out // 4, n_in, dtype=torch.int16)
    for n in range(n_out):
        for kb in range(n_in // 64):
            for pos in range(64):  # position within the block after steps (1)-(2)
                k = kb * 64 + (pos // 32) * 32 + V2_WITHIN_32[pos % 32]
                word = (n % 4) * 16 + pos // 4
                nibble = pos % 4
                current = int(out[n // 4, kb * 64 + word]) & 0xFFFF
                current |= int(q_out_in[n, k]) << (4 * nibble)
                out[n // 4, kb * 64 + word] = current - (1 << 16) if current >= (1 << 15) else current
    return out


def make_v2_tensors(qweight, qzeros, scales, group_size, padded_groups, dtype=torch.float16):
    """A TinyChat v2 linear built here from an AWQ triple, independently of the code under test."""
    q_out_in = ref_unpack(qweight).t()
    zeros = ref_unpack(qzeros).float()
    n_out = q_out_in.shape[0]
    scales_v2 = torch.zeros(padded_groups, n_out, dtype=dtype)
    scaled_zeros_v2 = torch.zeros(padded_groups, n_out, dtype=dtype)
    scales_v2[: scales.shape[0]] = scales.to(dtype)
    scaled_zeros_v2[: scales.shape[0]] = (-(scales_v2[: scales.shape[0]].float() * zeros)).to(dtype)
    return ref_pack_v2(q_out_in), scales_v2, scaled_zeros_v2


def test_v2_hand_word():
    # Row 0 = column index % 16, row 1 = 1: word 0 of row 0 holds columns 0, 8, 16, 24 → 0, 8, 0, 8.
    q = torch.zeros(8, 64, dtype=torch.int64)
    q[0] = torch.arange(64) % 16
    q[1] = 1
    v2, _, _ = awq_to_tinychat_v2(pack_awq(q.t().contiguous()), pack_awq(torch.zeros(1, 8, dtype=torch.int64)),
                                  torch.ones(1, 8, dtype=torch.float16), group_size=64)  # fmt: skip
    assert int(v2[0, 0]) & 0xFFFF == 0x8080
    assert int(v2[0, 16]) & 0xFFFF == 0x1111  # word 16 starts row 1
    assert int(v2[0, 1]) & 0xFFFF == (9 << 12) | (1 << 8) | (9 << 4) | 1  # columns 1, 9, 17, 25


def test_awq_to_v2_matches_element_by_element_packing():
    awq = random_awq(128, 16, 64, seed=20)
    qweight_v2, scales_v2, scaled_zeros_v2 = awq_to_tinychat_v2(*awq, group_size=64)
    expected = make_v2_tensors(*awq, 64, padded_groups=16)  # 2 groups, padded to 8·2 for g = 64
    assert qweight_v2.dtype == torch.int16 and qweight_v2.shape == (4, 128)
    assert torch.equal(qweight_v2, expected[0])
    assert torch.equal(scales_v2, expected[1])
    assert torch.equal(scaled_zeros_v2, expected[2])


def test_v2_file_loads_to_the_same_dequantized_weights(tmp_path):
    w = torch.randn(384, 24, generator=torch.Generator().manual_seed(21))
    awq = quantize_rtn(w, group_size=128)
    qweight_v2, scales_v2, scaled_zeros_v2 = make_v2_tensors(*awq, 128, padded_groups=8)
    path = tmp_path / "tiny-w4-g128-awq-v2.pt"
    torch.save(
        {"layers.0.mlp.up_proj.qweight": qweight_v2, "layers.0.mlp.up_proj.scales": scales_v2,
         "layers.0.mlp.up_proj.scaled_zeros": scaled_zeros_v2},
        path,
    )  # fmt: skip
    state = torch.load(path, weights_only=True)
    loaded = tinychat_v2_to_awq(
        state["layers.0.mlp.up_proj.qweight"],
        state["layers.0.mlp.up_proj.scales"],
        state["layers.0.mlp.up_proj.scaled_zeros"],
        in_features=384,
        out_features=24,
        group_size=128,
    )
    for got, want in zip(loaded, awq):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(ref_dequant(*loaded, 128), ref_dequant(*awq, 128))


def test_v2_zero_scale_column_and_bf16_tensors():
    awq = list(random_awq(128, 8, 128, seed=22))
    awq[2][0, 3] = 0.0  # a column whose scale is zero dequantizes to zeros whatever its zero point
    qweight_v2, scales_v2, scaled_zeros_v2 = make_v2_tensors(*awq, 128, padded_groups=8)
    qweight, qzeros, scales = tinychat_v2_to_awq(qweight_v2, scales_v2, scaled_zeros_v2, 128, 8, 128)
    assert torch.equal(qweight, awq[0]) and torch.equal(scales, awq[2])
    assert torch.equal(ref_dequant(qweight, qzeros, scales, 128), ref_dequant(*awq, 128))
    # bf16 scales (SPEC: fp16 or bf16) still give the exact integer zeros.
    awq = random_awq(128, 8, 128, seed=24)
    bf16_v2 = make_v2_tensors(*awq, 128, padded_groups=8, dtype=torch.bfloat16)
    qweight, qzeros, scales = tinychat_v2_to_awq(*bf16_v2, 128, 8, 128)
    assert torch.equal(qweight, awq[0]) and torch.equal(qzeros, awq[1])
    assert scales.dtype == torch.float16 and torch.equal(scales, awq[2].bfloat16().half())


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("int32 qweight", "int16"),
        ("short qweight", "int16"),
        ("in not multiple of 64", "in_features % 64"),
        ("fractional zero", "integer zeros"),
        ("negative zero", "integer zeros"),
        ("NaN zero", "integer zeros"),  # passed every comparison: a zero point of garbage, answers of garbage
        ("scales too short", "scales must be"),
    ],
)
def test_v2_errors(case, fragment):
    awq = random_awq(128, 8, 128, seed=23)
    qweight_v2, scales_v2, scaled_zeros_v2 = make_v2_tensors(*awq, 128, padded_groups=8)
    in_features = 128
    if case == "int32 qweight":
        qweight_v2 = qweight_v2.to(torch.int32)
    elif case == "short qweight":
        qweight_v2 = qweight_v2[:1]
    elif case == "in not multiple of 64":
        in_features = 96
        qweight_v2 = torch.zeros(2, 96, dtype=torch.int16)
        scales_v2 = scales_v2[:, :8]
    elif case == "fractional zero":
        scaled_zeros_v2[0, 0] = -scales_v2[0, 0] * 2.5
    elif case == "negative zero":
        scaled_zeros_v2[0, 0] = scales_v2[0, 0] * 3
    elif case == "NaN zero":
        scaled_zeros_v2[0, 0] = float("nan")
    elif case == "scales too short":
        scales_v2 = scales_v2[:0]
    with pytest.raises(CheckpointError) as info:
        tinychat_v2_to_awq(qweight_v2, scales_v2, scaled_zeros_v2, in_features, 8, group_size=32 if in_features == 96 else 128)
    assert fragment in str(info.value) and "\n" not in str(info.value)
