"""4-bit weights: the AWQ GEMM format (pack, unpack, quantize, TinyChat v2 import) and `Int4Linear`.

A leaf package: it knows nothing about models.
"""

from __future__ import annotations

from internvl_chat.quant.awq_format import (
    AWQ_ORDER,
    awq_to_tinychat_v2,
    concat_awq,
    dequantize_awq,
    pack_awq,
    quantize_rtn,
    tinychat_v2_to_awq,
    unpack_awq,
    validate_awq,
)
from internvl_chat.quant.int4_linear import BACKENDS, Int4Linear, int4_backend_supported

__all__ = [
    "AWQ_ORDER",
    "BACKENDS",
    "Int4Linear",
    "awq_to_tinychat_v2",
    "concat_awq",
    "dequantize_awq",
    "int4_backend_supported",
    "pack_awq",
    "quantize_rtn",
    "tinychat_v2_to_awq",
    "unpack_awq",
    "validate_awq",
]
