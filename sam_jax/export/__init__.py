"""Export SAM for runtimes without sam_jax: ONNX (onnxruntime, the browser demo) and StableHLO.

    from sam_jax import export
    model, params = sam_jax.load("ckpt/sam_vit_b")
    export.save(model, params, "sam_decoder.onnx", format="onnx", return_single_mask=True)
    export.save(model, params, "sam_encoder.onnx", format="onnx", part="encoder")
    export.save(model, params, "sam_decoder.stablehlo", format="stablehlo")

- ONNX decoder (`onnx.decoder_model`): Meta's `SamOnnxModel` with the inputs, outputs and options
  of Meta's `scripts/export_onnx_model.py` (any number of points; masks at the original size
  computed in the graph), so Meta's web demo and apps written for its file load ours.
- ONNX encoder (`onnx.encoder_model`): `x` (B, 3, S, S) -> `image_embeddings` (B, D, g, g), the
  interface of Meta's encoder export; weights over ~1.8 GB (vit_h) go to `<output>.data`.
- StableHLO (`stablehlo.export_decoder` / `export_encoder`): `jax.export` serializations, N
  points (or the encoder batch) symbolic, lowered for cpu, cuda and tpu. The decoder returns
  low-res logits: the client resizes them (`stablehlo.postprocess_masks`). The weights are
  inside, or over ~1.5 GB (vit_h's encoder: jax.export files cannot exceed 2 GiB) in
  `<output>.safetensors` beside it, passed as the first arguments:
  `exported.call(*stablehlo.read_weights(weights_file)[1], x)`.

The graphs are written from the params pytree, node by node (`sam_jax.export.onnx`); `onnx` is
needed only to write ONNX files (imported there, lazily). Files appear whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

from sam_jax import paths
from sam_jax.export import onnx as onnx_export
from sam_jax.export import onnx_tiny_vit, stablehlo
from sam_jax.export.signature import (
    FORMATS,
    ONNX_DATA_SUFFIX,
    PARTS,
    STABLEHLO_WEIGHTS_SUFFIX,
    check_options,
)

__all__ = [
    "FORMATS",
    "PARTS",
    "build",
    "check_options",
    "data_path",
    "external_path",
    "save",
    "save_loaded",
]


def _part_params(params, part: str) -> dict:
    keys = ("image_encoder",) if part == "encoder" else ("prompt_encoder", "mask_decoder")
    return {k: params[k] for k in keys}


def _nbytes(params) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(params))


def build(
    model,
    params,
    format: str,
    part: str = "decoder",
    *,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    gelu_approximate: bool = False,
    opset: int | None = None,
    platforms: Sequence[str] | None = None,
    weights_as_arguments: bool = False,
):
    """The export in memory: an `onnx.ModelProto` or a `jax.export.Exported` (with
    `weights_as_arguments`, one whose first arguments are `stablehlo.weight_arrays(params,
    part)`)."""
    check_options(
        format,
        part,
        return_single_mask,
        use_stability_score,
        return_extra_metrics,
        gelu_approximate,
    )
    if format == "onnx":
        if platforms is not None:
            raise ValueError("platforms apply to the stablehlo format")
        if weights_as_arguments:
            raise ValueError("weights_as_arguments applies to the stablehlo format")
        opset = onnx_export.DEFAULT_OPSET if opset is None else opset
        if part == "encoder" and model.config.encoder_type == "tiny_vit":
            return onnx_tiny_vit.tiny_vit_encoder_model(model, params, gelu_approximate, opset)
        if part == "encoder":
            return onnx_export.encoder_model(model, params, gelu_approximate, opset)
        return onnx_export.decoder_model(
            model,
            params,
            return_single_mask,
            use_stability_score,
            return_extra_metrics,
            gelu_approximate,
            opset,
        )

    if opset is not None:
        raise ValueError("opset applies to the onnx format")
    if part == "encoder":
        return stablehlo.export_encoder(model, params, platforms, weights_as_arguments)
    return stablehlo.export_decoder(
        model, params, return_single_mask, use_stability_score, platforms, weights_as_arguments
    )


def data_path(path: str) -> str:
    """Where an ONNX file's external weights go: `<path>.data` beside it."""
    return f"{os.fspath(path)}{ONNX_DATA_SUFFIX}"


def external_path(path: str, format: str) -> str:
    """Where an export's external weights go: `<path>.data` (ONNX) or `<path>.safetensors`
    (StableHLO) beside it."""
    suffix = ONNX_DATA_SUFFIX if format == "onnx" else STABLEHLO_WEIGHTS_SUFFIX
    return f"{os.fspath(path)}{suffix}"


def save(
    model,
    params,
    path: str | os.PathLike,
    format: str,
    part: str = "decoder",
    *,
    overwrite: bool = False,
    external_data: bool | None = None,
    **options,
) -> list[str]:
    """Builds the export (`build`'s options) and writes it to `path`; returns the files written.

    The file appears whole or not at all: a local output is written beside it and renamed, and
    its folder is tried before the export is built, so an output that cannot be written fails
    fast (OSError). An existing output is refused (FileExistsError) unless `overwrite`.
    `external_data`: the weights in a file beside `path` (None: only when they exceed ~1.8 GB for
    ONNX, ~1.5 GB for StableHLO, as vit_h's encoder must: neither format's files can exceed 2
    GiB): ONNX's external data in `<path>.data`, which onnxruntime reads itself, or, for
    StableHLO, `<path>.safetensors`, whose arrays are the export's first arguments (see
    `sam_jax.export.stablehlo`). Each file appears whole, and on failure neither is left.
    """
    return save_loaded(
        lambda: (model, params),
        path,
        format,
        part,
        overwrite=overwrite,
        external_data=external_data,
        **options,
    )


def save_loaded(
    load: Callable[[], tuple],
    path: str | os.PathLike,
    format: str,
    part: str = "decoder",
    *,
    overwrite: bool = False,
    external_data: bool | None = None,
    **options,
) -> list[str]:
    """`save` of the (model, params) that `load()` returns, called once the output has been
    tried (a command reads the checkpoint only when its output can be written)."""

    path = os.fspath(path)
    check_options(
        format,
        part,
        options.get("return_single_mask", False),
        options.get("use_stability_score", False),
        options.get("return_extra_metrics", False),
        options.get("gelu_approximate", False),
    )
    if "weights_as_arguments" in options:  # what external_data decides
        raise TypeError("save takes external_data, not weights_as_arguments")
    if paths.isdir(path):
        raise IsADirectoryError(f"output {path} is a folder; give the path of a file")
    paths.check_new_output(path, overwrite)
    if external_data:
        paths.check_new_output(external_path(path, format), overwrite)
    what = "external ONNX data" if format == "onnx" else "an external StableHLO weights file"
    if paths.is_remote(path):
        if external_data:
            raise ValueError(f"{what} needs a local output, got {path}")
        paths.check_writable(paths.parent(path))
        model, params = load()
        if _wants_external(format, part, params, external_data):
            raise ValueError(f"the weights need {what}, which needs a local output")
        paths.write_bytes(path, _serialize(build(model, params, format, part, **options)))
        return [path]
    placed: list[str] = []  # an external weights file already renamed into place
    try:
        with paths.atomic_output(path, overwrite) as tmp:
            try:
                model, params = load()
                external = _wants_external(format, part, params, external_data)
                if format == "onnx":
                    artifact = build(model, params, format, part, **options)
                    if external:
                        _save_external(artifact, path, tmp, overwrite, placed)
                    else:
                        tmp.write_bytes(_serialize(artifact))
                else:
                    artifact = build(
                        model, params, format, part, weights_as_arguments=external, **options
                    )
                    data = _serialize(artifact)  # before the weights: a failure writes nothing
                    if external:
                        _save_weights(model, params, part, path, overwrite, placed)
                    tmp.write_bytes(data)
            except BaseException:  # before atomic_output removes the folders it made
                _remove_placed(placed)
                raise
    except BaseException:  # the rename failed
        _remove_placed(placed)
        raise
    return [path, *placed]


def _remove_placed(placed: list[str]) -> None:
    while placed:
        with contextlib.suppress(OSError):
            os.remove(placed.pop())


def _wants_external(format: str, part: str, params, external_data: bool | None) -> bool:
    if external_data is not None:
        return bool(external_data)
    if format == "onnx":
        return _nbytes(_part_params(params, part)) > onnx_export.EXTERNAL_DATA_ABOVE

    return _nbytes(_part_params(params, part)) > stablehlo.EXTERNAL_WEIGHTS_ABOVE


def _serialize(artifact) -> bytes:
    if hasattr(artifact, "SerializeToString"):
        try:
            return artifact.SerializeToString()
        except ValueError as e:  # protobuf refuses messages over 2 GiB
            raise ValueError(f"cannot serialize the ONNX model ({e}); use external data") from None

    return stablehlo.serialize(artifact)


def _save_external(proto, path: str, tmp, overwrite: bool, placed: list[str]) -> None:
    """The weights to `<path>.data` (appended to `placed` once in place), then the graph to
    `tmp`, which the caller renames to `path`."""

    data = data_path(path)
    with paths.atomic_output(data, overwrite) as tmp_data, open(tmp_data, "wb") as f:
        onnx_export.externalize(proto, os.path.basename(data), f)
    placed.append(data)
    tmp.write_bytes(proto.SerializeToString())


def _save_weights(model, params, part: str, path: str, overwrite: bool, placed: list) -> None:
    """The StableHLO export's weights to `<path>.safetensors` (appended to `placed` once in
    place), in the order of its arguments."""
    import json

    weights = stablehlo.weights_path(path)
    metadata = {
        "sam_jax.part": part,
        "sam_jax.export": os.path.basename(path),
        "sam_jax.config": json.dumps(model.config.to_dict()),
    }
    with paths.atomic_output(weights, overwrite) as tmp, open(tmp, "wb") as f:
        stablehlo.write_weights(f, stablehlo.weight_arrays(params, part), metadata)
    placed.append(weights)
