"""The interfaces of the exported functions, shared by the ONNX and StableHLO exports.

Decoder (prompt encoder + mask decoder: Meta's `SamOnnxModel`), S = image_size, D =
prompt_embed_dim, g = S / patch_size, m = 4g, N = any number of points:

    image_embeddings  float32 (1, D, g, g)   the encoder output, channels first
    point_coords      float32 (1, N, 2)      xy in the resized S x S input frame
    point_labels      float32 (1, N)         1 fg, 0 bg, 2/3 box corners, -1 padding point
    mask_input        float32 (1, 1, m, m)   low-res logits of a previous prediction
    has_mask_input    float32 (1,)           1 uses mask_input, 0 ignores it
    orig_im_size      float32 (2,)           (H, W) of the original image (ONNX only)

Encoder: `x` float32 (B, 3, S, S) normalised and zero-padded -> `image_embeddings` (B, D, g, g).

A StableHLO export with external weights takes them first: `exported.call(*weights, *inputs)`,
the weights as its `<output>.safetensors` file orders them.
"""

from __future__ import annotations

FORMATS = ("onnx", "stablehlo")
PARTS = ("decoder", "encoder")

DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
# The StableHLO decoder takes the first five (its outputs cannot take their size from a value).
STABLEHLO_DECODER_INPUTS = DECODER_INPUTS[:5]
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
EXTRA_METRICS_OUTPUTS = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
STABLEHLO_DECODER_OUTPUTS = ("iou_predictions", "low_res_masks")
ENCODER_INPUTS = ("x",)
ENCODER_OUTPUTS = ("image_embeddings",)

# SamOnnxModel's constants: Sam.mask_threshold and its stability_score_offset.
MASK_THRESHOLD = 0.0
STABILITY_SCORE_OFFSET = 1.0
# SamOnnxModel.select_masks: the single-mask output wins when there are more than 2.5 points
# (padding point included), else the best-scored multimask output.
SINGLE_MASK_MIN_POINTS = 2.5
SINGLE_MASK_REWEIGHT = 1000.0

# Where external weights go, beside the output: ONNX's external data, the StableHLO weights.
ONNX_DATA_SUFFIX = ".data"
STABLEHLO_WEIGHTS_SUFFIX = ".safetensors"

DECODER_OPTIONS = ("return_single_mask", "use_stability_score", "return_extra_metrics")


def check_options(
    format: str,
    part: str,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    gelu_approximate: bool = False,
) -> None:
    """ValueError (one line) for an unknown format or part, or options that do not apply."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    given = [
        name
        for name, value in zip(
            DECODER_OPTIONS,
            (return_single_mask, use_stability_score, return_extra_metrics),
            strict=True,
        )
        if value
    ]
    if part == "encoder" and given:
        raise ValueError(f"{', '.join(given)}: decoder options, not for the image encoder")
    if format == "stablehlo" and return_extra_metrics:
        raise ValueError(
            "return_extra_metrics needs the ONNX format: its metrics are computed on the masks "
            "at the original image size, which jax.export cannot take from an input's value"
        )
    if format == "stablehlo" and gelu_approximate:
        raise ValueError("gelu_approximate applies to the ONNX format")
