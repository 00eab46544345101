"""`internvl-chat quantize SRC DST`: make a 4-bit AWQ checkpoint from a float InternVL3 checkpoint.

Method (AWQ, Lin et al.; the losses and grids of AutoAWQ): run calibration images and text through
the real model, then block by block collect the inputs of the decoder's linears and, for each group
of linears that share an input, search per-input-channel scales s = mean|x|^α (α on a grid in
[0, 1]) that minimise the output error of the module they feed (attention for q/k/v, the MLP for
gate/up, the linear itself for down) when those linears are quantized. The best scales are folded
into the preceding norm (or linear), then an optional clipping search shrinks each group's range,
and the weights are quantized per group (SPEC §2 quantizer) and packed in the AWQ GEMM layout. RTN
skips calibration and the searches. The output is the published layout (lmdeploy's
InternVL3-*-AWQ), written complete or not at all.

Modules: `command` (flags → a run), `pipeline` (a run in order), `checks` (what is refused, before
the work and before writing), `calibration` (calibration data), `activations` (the samples through
the decoder, block by block), `search` (AWQ's scale and clip searches), `blocks` (each block
searched, quantized and packed), `tensor_names` (fused, quantized and file names of the linears),
`writer` (the published layout), `output_folder` (staging, publishing, clean-up), `progress`.
"""

# the names other modules, scripts and tests import from here
from .blocks import quantize_model
from .calibration import Sample, calibration_files, calibration_samples
from .checks import check_group_size, check_source_values
from .command import build_parser, main
from .pipeline import quantize_checkpoint
from .progress import BarProgress, Progress
from .search import fake_quantize, group_grams, linear_error, search_clip
from .writer import float_tensors, original_config, write_checkpoint

__all__ = [
    "BarProgress", "Progress", "Sample", "build_parser", "calibration_files", "calibration_samples", "check_group_size",
    "check_source_values", "fake_quantize", "float_tensors", "group_grams", "linear_error", "main", "original_config",
    "quantize_checkpoint", "quantize_model", "search_clip", "write_checkpoint",
]  # fmt: skip
