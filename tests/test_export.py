"""sam_jax.export and sam-jax-export: ONNX against Meta's SamOnnxModel in onnxruntime, StableHLO
(weights inside or in a safetensors file beside it) deserialized and run in a process that never
imports sam_jax, the command's errors.

A tiny SAM (tiny_config, 128 x 128 input, 8 x 8 embedding grid, 32 x 32 low-res masks) with the
official model's perturbed random weights, converted to ours.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from segment_anything.utils.onnx import SamOnnxModel

from sam_jax import export, transforms
from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.checkpoints.onnx_weights import read_onnx_files
from sam_jax.cli.export import main
from sam_jax.config import get_config, tiny_config
from sam_jax.export import onnx as onnx_export
from sam_jax.export import stablehlo
from sam_jax.modeling import build_sam
from sam_jax.predictor import SamPredictor
from tests.torch_reference import build_official, rel_err, state_dict_numpy

TOL = 1e-4
CONFIG = tiny_config(decoder_num_heads=8)  # 8: what a .pth loads with by default
S, G, D, M = CONFIG.image_size, CONFIG.embedding_size, CONFIG.prompt_embed_dim, 32
PROG = "sam-jax-export"


@pytest.fixture(scope="module")
def official():
    return build_official(CONFIG, seed=5)


@pytest.fixture(scope="module")
def pair(official):
    params = state_dict_to_params(state_dict_numpy(official), CONFIG)
    return build_sam(CONFIG), jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def pth(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(official.state_dict(), path)
    return path


def _feeds(rng, num_clicks, orig_im_size, has_mask, box=False):
    """SamOnnxModel inputs as Meta's demo builds them: clicks, then a box or a padding point."""
    coords = rng.random((num_clicks, 2)) * S
    labels = list(rng.integers(0, 2, num_clicks))
    if box:
        coords = np.concatenate([coords, [[10.0, 20.0], [90.0, 100.0]]])
        labels += [2, 3]
    else:
        coords = np.concatenate([coords, [[0.0, 0.0]]])
        labels += [-1]
    return dict(
        image_embeddings=rng.standard_normal((1, D, G, G)).astype(np.float32),
        point_coords=coords[None].astype(np.float32),
        point_labels=np.array([labels], np.float32),
        mask_input=rng.standard_normal((1, 1, M, M)).astype(np.float32) * 3,
        has_mask_input=np.array([float(has_mask)], np.float32),
        orig_im_size=np.array(orig_im_size, np.float32),
    )


FEEDS = [  # (clicks, original size, has_mask, box): upscaling and downscaling, a mask, a box
    (1, (300, 450), False, False),
    (3, (90, 70), True, False),
    (2, (128, 128), False, True),
]


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _official_outputs(official, options, feeds):
    ref = SamOnnxModel(official, **{"return_single_mask": False, **options})
    with torch.no_grad():
        out = ref(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [o.numpy() for o in out]


DECODER_OPTIONS = {
    "multimask": {},
    "single": dict(return_single_mask=True),
    "stability": dict(use_stability_score=True),
    "all": dict(return_single_mask=True, use_stability_score=True, return_extra_metrics=True),
    "extra": dict(return_extra_metrics=True),
}


@pytest.mark.parametrize("name", list(DECODER_OPTIONS))
def test_onnx_decoder_matches_official_sam_onnx_model(official, pair, name):
    options = DECODER_OPTIONS[name]
    model, params = pair
    proto = onnx_export.decoder_model(model, params, **options)
    onnx.checker.check_model(proto, full_check=True)
    sess = _session(proto)
    names = (
        export.signature.EXTRA_METRICS_OUTPUTS
        if options.get("return_extra_metrics")
        else (export.signature.DECODER_OUTPUTS)
    )
    assert [o.name for o in sess.get_outputs()] == list(names)
    rng = np.random.default_rng(1)
    errors = {}
    for i, case in enumerate(FEEDS):
        feeds = _feeds(rng, *case)
        ours = sess.run(None, feeds)
        theirs = _official_outputs(official, options, feeds)
        k = 1 if options.get("return_single_mask") else 4
        assert ours[0].shape == (1, k, *case[1])
        for out_name, a, b in zip(names, ours, theirs, strict=True):
            assert a.shape == b.shape, out_name
            if out_name == "areas":  # pixel counts of thresholded logits: equal, or a flip
                assert a.dtype == np.int64 and np.abs(a - b).max() <= 2, (a, b)
                continue
            errors[f"{out_name}[{i}]"] = err = rel_err(a, b)
            assert err <= TOL, (out_name, i, err)
    print(name, json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))


def test_onnx_decoder_interface_is_meta_export_script(pair):
    """Names, dtypes and shapes of `scripts/export_onnx_model.py`'s file; a readable graph."""
    proto = onnx_export.decoder_model(*pair, return_single_mask=True)
    assert [o.opset_import[0].version for o in [proto]] == [17] and proto.ir_version == 8

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: (i.type.tensor_type.elem_type, dims(i)) for i in proto.graph.input}
    f = onnx.TensorProto.FLOAT
    assert inputs == {
        "image_embeddings": (f, [1, D, G, G]),
        "point_coords": (f, [1, "num_points", 2]),
        "point_labels": (f, [1, "num_points"]),
        "mask_input": (f, [1, 1, M, M]),
        "has_mask_input": (f, [1]),
        "orig_im_size": (f, [2]),
    }
    assert list(inputs) == list(export.signature.DECODER_INPUTS)
    outputs = {o.name: dims(o) for o in proto.graph.output}
    assert outputs == {
        "masks": [1, 1, "height", "width"],
        "iou_predictions": [1, 1],
        "low_res_masks": [1, 1, M, M],
    }
    weights = {t.name for t in proto.graph.initializer}
    assert "mask_decoder/transformer/layers_0/self_attn/q_proj/kernel" in weights
    assert "prompt_encoder/points/pe_layer/positional_encoding_gaussian_matrix" in weights
    assert all(n.name and "/" in n.name or n.op_type == "Identity" for n in proto.graph.node)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["sam_jax.config"]) == CONFIG.to_dict()
    assert meta["sam_jax.return_single_mask"] == "true"
    # Every weight is used; strict shape inference agrees with the declared shapes.
    used = {i for n in proto.graph.node for i in n.input}
    assert weights <= used, sorted(weights - used)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def test_onnx_decoder_any_number_of_points_opset_18_and_gelu_approximate(official, pair):
    """One file for 1..6 points; opset 18 (reduction axes as inputs); tanh GELU as Meta's
    --gelu-approximate."""
    for opset, approximate in ((18, False), (17, True)):
        proto = onnx_export.decoder_model(*pair, gelu_approximate=approximate, opset=opset)
        sess = _session(proto)
        ref = official
        if approximate:
            ref = build_official(CONFIG, seed=5)
            for m in ref.modules():
                if isinstance(m, torch.nn.GELU):
                    m.approximate = "tanh"
        rng = np.random.default_rng(opset)
        for clicks in (0, 5):
            feeds = _feeds(rng, clicks, (200, 100), True)
            ours = sess.run(None, feeds)
            theirs = _official_outputs(ref, {}, feeds)
            for a, b in zip(ours, theirs, strict=True):
                assert rel_err(a, b) <= TOL


def test_onnx_decoder_of_a_text_model_takes_text_embeddings_and_reads_back(tmp_path):
    """A model with a text path exports its text token (input text_embeddings (1, T, E)): T = 1
    gives Sam.decode's outputs with that CLIP embedding, T = 0 those without text; the file
    reads back with the text projection (nothing of the model left out on either side)."""
    config = tiny_config(decoder_num_heads=8, text_embed_dim=12)
    model = build_sam(config)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(  # every parameter perturbed (init zeros hide mistakes)
        lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32),
        model.init_params(jax.random.key(0)),
    )
    proto = onnx_export.decoder_model(model, params)
    assert proto.graph.input[-1].name == "text_embeddings"
    sess = _session(proto)
    feeds = _feeds(rng, 2, (128, 128), True)
    text = rng.standard_normal((1, 1, 12)).astype(np.float32) * 3
    for t in (1, 0):
        got = sess.run(None, {**feeds, "text_embeddings": text[:, :t]})
        want_masks, want_iou = model.apply(
            {"params": params},
            jnp.asarray(feeds["image_embeddings"]).transpose(0, 2, 3, 1),
            jnp.asarray(feeds["point_coords"])[None],
            jnp.asarray(feeds["point_labels"], jnp.int32)[None],
            jnp.asarray(feeds["mask_input"])[None, :, 0],
            jnp.asarray(feeds["has_mask_input"] > 0)[None],
            None,
            jnp.asarray(text[:, :t]) if t else None,
            method=model.decode,
        )
        assert rel_err(got[1], want_iou[0]) <= TOL
        assert rel_err(got[2], want_masks[0]) <= TOL
    assert rel_err(got[2], sess.run(None, {**feeds, "text_embeddings": text})[2]) > 1e-2

    enc, dec = tmp_path / "encoder.onnx", tmp_path / "decoder.onnx"
    onnx.save(onnx_export.encoder_model(model, params), enc)
    onnx.save(proto, dec)
    found = read_onnx_files(enc, dec)
    assert found.config.text_embed_dim == 12
    back = found.params["prompt_encoder"]["text_projection"]
    np.testing.assert_array_equal(
        back["kernel"], params["prompt_encoder"]["text_projection"]["kernel"]
    )
    np.testing.assert_array_equal(back["bias"], params["prompt_encoder"]["text_projection"]["bias"])


def test_onnx_encoder_matches_official(official, pair):
    proto = onnx_export.encoder_model(*pair)
    onnx.checker.check_model(proto, full_check=True)
    sess = _session(proto)
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["image_embeddings"]
    x = np.random.default_rng(2).standard_normal((2, 3, S, S)).astype(np.float32)
    ours = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        theirs = official.image_encoder(torch.from_numpy(x)).numpy()
    assert ours.shape == (2, D, G, G)
    err = rel_err(ours, theirs)
    print(f"encoder rel err {err:.1e}")
    assert err <= TOL


def test_onnx_external_data(pair, tmp_path):
    """Weights in <output>.data (what vit_h's encoder needs): onnxruntime loads the pair."""
    out = tmp_path / "enc.onnx"
    written = export.save(*pair, out, "onnx", "encoder", external_data=True)
    assert written == [str(out), str(out) + ".data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx", "enc.onnx.data"]
    assert out.stat().st_size < 100_000 < (tmp_path / "enc.onnx.data").stat().st_size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((1, 3, S, S)).astype(np.float32)
    inline = _session(onnx_export.encoder_model(*pair)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], inline)


def test_stablehlo_decoder_matches_onnx_and_the_client_resize(pair):
    """The StableHLO decoder is the ONNX graph up to the resize; `postprocess_masks` (the
    documented client recipe) gives the ONNX masks from its low-res logits."""
    model, params = pair
    for options in ({}, dict(return_single_mask=True, use_stability_score=True)):
        exp = stablehlo.export_decoder(model, params, platforms=["cpu"], **options)
        sess = _session(onnx_export.decoder_model(model, params, **options))
        rng = np.random.default_rng(4)
        for case in FEEDS:
            feeds = _feeds(rng, *case)
            masks, iou, low_res = sess.run(None, feeds)
            out = exp.call(*(feeds[k] for k in export.signature.STABLEHLO_DECODER_INPUTS))
            assert sorted(out) == ["iou_predictions", "low_res_masks"]
            assert rel_err(out["low_res_masks"], low_res) <= TOL
            assert rel_err(out["iou_predictions"], iou) <= TOL
            resized = stablehlo.postprocess_masks(out["low_res_masks"], case[1], S)
            assert rel_err(resized, masks) <= TOL


@pytest.mark.slow  # vit_b: a 64 x 64 grid, 14 x 14 windows padded to 70, 1024 -> 1500 x 2250 masks
def test_full_size_vit_b_onnx_matches_official():
    config = get_config("vit_b")
    official = build_official(config, seed=7)
    params = state_dict_to_params(state_dict_numpy(official), config)
    model = build_sam(config)
    sess = _session(onnx_export.decoder_model(model, params))
    rng = np.random.default_rng(7)
    feeds = dict(
        image_embeddings=rng.standard_normal((1, 256, 64, 64)).astype(np.float32),
        point_coords=np.array([[[500, 400], [300, 700], [0, 0]]], np.float32),
        point_labels=np.array([[1, 0, -1]], np.float32),
        mask_input=np.zeros((1, 1, 256, 256), np.float32),
        has_mask_input=np.array([0], np.float32),
        orig_im_size=np.array([1500, 2250], np.float32),
    )
    errors = {}
    theirs = _official_outputs(official, {}, feeds)
    ours = sess.run(None, feeds)
    for name, a, b in zip(export.signature.DECODER_OUTPUTS, ours, theirs, strict=True):
        errors[name] = rel_err(a, b)
    x = rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    sess = _session(onnx_export.encoder_model(model, params))
    with torch.no_grad():
        errors["image_embeddings"] = rel_err(
            sess.run(None, {"x": x})[0], official.image_encoder(torch.from_numpy(x)).numpy()
        )
    print("vit_b", json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))
    assert max(errors.values()) <= TOL, errors


# The whole of the other process: jax, numpy and json only. An export with a weights file beside
# it takes its arrays first, in the order of their data in the file (the documented recipe).
RUNNER = textwrap.dedent(
    """
    import json
    import os
    import sys
    import numpy as np
    from jax import export

    folder = sys.argv[1]

    def read_weights(path):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")  # safetensors: u64 header size, JSON
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        arrays = []
        for t in sorted(header.values(), key=lambda t: t["data_offsets"][0]):
            begin, end = t["data_offsets"]
            assert t["dtype"] == "F32", t
            x = np.fromfile(path, "<f4", count=(end - begin) // 4, offset=8 + size + begin)
            arrays.append(x.reshape(t["shape"]))
        return arrays

    def load(name):
        with open(f"{folder}/{name}", "rb") as f:
            exp = export.deserialize(bytearray(f.read()))
        path = f"{folder}/{name}.safetensors"
        if not os.path.exists(path):
            return exp.call
        weights = read_weights(path)
        assert [a.shape for a in exp.in_avals[: len(weights)]] == [w.shape for w in weights]
        print("external weights", name, len(weights))
        return lambda *args: exp.call(*weights, *args)

    z = np.load(f"{folder}/inputs.npz")
    out = {}
    out["embedding"] = load("encoder.stablehlo")(z["x"])["image_embeddings"]
    for name in ("decoder", "single"):
        call = load(f"{name}.stablehlo")
        for case in ("one", "three", "mask"):
            args = [z[f"{case}/{k}"] for k in ("emb", "coords", "labels", "mask", "has_mask")]
            r = call(*args)
            out[f"{name}/{case}/iou"] = r["iou_predictions"]
            out[f"{name}/{case}/low_res"] = r["low_res_masks"]
    np.savez(f"{folder}/outputs.npz", **{k: np.asarray(v) for k, v in out.items()})
    leaked = sorted(m for m in sys.modules if m == "sam_jax" or m.startswith("sam_jax."))
    assert not leaked, leaked
    print("ran without sam_jax")
    """
)


@pytest.mark.parametrize("external", [False, True], ids=["weights_inside", "external_weights"])
def test_stablehlo_runs_without_sam_jax_and_matches_the_predictor(pair, tmp_path, external):
    """Weights inside, or forced into <output>.safetensors (what vit_h's encoder needs): the
    other process reads them with numpy and json and passes them first."""
    model, params = pair
    for name, part, options in (
        ("encoder", "encoder", {}),
        ("decoder", "decoder", {}),
        ("single", "decoder", dict(return_single_mask=True)),
    ):
        out = tmp_path / f"{name}.stablehlo"
        written = export.save(
            model, params, out, "stablehlo", part, external_data=external or None, **options
        )
        assert written == [str(out), str(out) + ".safetensors"][: 1 + external]
    if external:  # the graph only: the weights are in the file beside it
        enc = tmp_path / "encoder.stablehlo"
        assert enc.stat().st_size < (tmp_path / "encoder.stablehlo.safetensors").stat().st_size
    image = np.random.default_rng(5).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    predictor = SamPredictor(model, params)
    predictor.set_image(image)
    x, _ = transforms.preprocess_image(image, S)
    emb = np.asarray(predictor.get_image_embedding()).transpose(0, 3, 1, 2)  # NCHW
    clicks = {
        "one": (np.array([[60.0, 40.0]]), np.array([1])),
        "three": (np.array([[60.0, 40.0], [10.0, 80.0], [100.0, 20.0]]), np.array([1, 0, 1])),
    }
    expected, inputs = {}, {"x": np.asarray(x).transpose(2, 0, 1)[None]}
    for case, (pts, labels) in {**clicks, "mask": clicks["one"]}.items():
        mask = None
        if case == "mask":  # the previous prediction's best low-res logits as mask input
            _, iou, low = predictor.predict(*clicks["one"], multimask_output=True)
            mask = low[np.argmax(iou)][None]
        multi = predictor.predict(pts, labels, mask_input=mask, multimask_output=True)
        single = predictor.predict(pts, labels, mask_input=mask, multimask_output=False)
        expected[case] = (single, multi)
        coords = np.asarray(predictor.transform.apply_coords(pts, image.shape[:2]), np.float32)
        inputs.update(
            {
                f"{case}/emb": emb,
                f"{case}/coords": np.concatenate([coords, [[0.0, 0.0]]])[None].astype(np.float32),
                f"{case}/labels": np.array([[*labels, -1]], np.float32),
                f"{case}/mask": np.zeros((1, 1, M, M), np.float32) if mask is None else mask[None],
                f"{case}/has_mask": np.array([0.0 if mask is None else 1.0], np.float32),
            }
        )
    np.savez(tmp_path / "inputs.npz", **inputs)
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ran without sam_jax" in run.stdout
    assert run.stdout.count("external weights") == (3 if external else 0), run.stdout
    out = dict(np.load(tmp_path / "outputs.npz"))

    ours = predictor.get_image_embedding()
    assert rel_err(out["embedding"], np.asarray(ours).transpose(0, 3, 1, 2)) <= TOL
    errors = {}
    for case, ((_, iou1, low1), (_, iou3, low3)) in expected.items():
        iou, low = out[f"decoder/{case}/iou"][0], out[f"decoder/{case}/low_res"][0]
        assert iou.shape == (4,) and low.shape == (4, M, M)
        pairs = [(low[1:], low3), (iou[1:], iou3), (low[:1], low1), (iou[:1], iou1)]
        errors[case] = max(rel_err(a, b) for a, b in pairs)
        assert errors[case] <= TOL, (case, errors[case])
        # SamOnnxModel.select_masks: with 2 points (a click and the padding point) the best
        # multimask output, with more the single-mask output.
        best = 0 if case == "three" else 1 + int(np.argmax(iou3))
        assert rel_err(out[f"single/{case}/low_res"][0, 0], low[best]) <= TOL
        assert rel_err(out[f"single/{case}/iou"][0, 0], iou[best]) <= TOL
    print("stablehlo vs predictor", json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))


def test_stablehlo_serialized_shapes(pair):
    exp = stablehlo.export_decoder(*pair)
    assert exp.platforms == ("cpu", "cuda", "tpu")
    assert [str(a.shape) for a in exp.in_avals] == [
        f"(1, {D}, {G}, {G})",
        "(1, num_points, 2)",
        "(1, num_points)",
        f"(1, 1, {M}, {M})",
        "(1,)",
    ]
    enc = stablehlo.export_encoder(*pair, platforms="cpu")
    assert [str(a.shape) for a in enc.in_avals] == [f"(batch, 3, {S}, {S})"]
    assert [str(a.shape) for a in enc.out_avals] == [f"(batch, {D}, {G}, {G})"]
    # Weights as arguments: only their shapes are needed (no arrays), then the inputs.
    model, params = pair
    shapes = jax.eval_shape(lambda p: p, params)
    dec = stablehlo.export_decoder(model, shapes, platforms="cpu", weights_as_arguments=True)
    weights = stablehlo.weight_arrays(params, "decoder")
    assert [a.shape for a in dec.in_avals[: len(weights)]] == [w.shape for _, w in weights]
    assert [str(a.shape) for a in dec.in_avals[len(weights) :]] == [
        str(a.shape) for a in exp.in_avals
    ]
    assert len(dec.serialize()) < len(stablehlo.export_decoder(*pair, platforms="cpu").serialize())


def test_stablehlo_external_weights_file(pair, tmp_path, monkeypatch):
    """The safetensors layout: u64 header size, JSON header padded to 8 bytes, the data in the
    order of the export's arguments with no gaps; `read_weights` returns them in that order."""
    model, params = pair
    out = tmp_path / "enc.stablehlo"
    export.save(model, params, out, "stablehlo", "encoder", external_data=True, platforms="cpu")
    raw = (tmp_path / "enc.stablehlo.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert (8 + size) % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    meta = header.pop("__metadata__")
    assert meta["sam_jax.part"] == "encoder" and meta["sam_jax.export"] == "enc.stablehlo"
    assert json.loads(meta["sam_jax.config"]) == CONFIG.to_dict()
    expected = stablehlo.weight_arrays(params, "encoder")
    assert list(header) == json.loads(meta["sam_jax.arguments"]) == [n for n, _ in expected]
    assert all(n.startswith("image_encoder/") for n in header)
    assert "image_encoder/blocks_0/attn/qkv/kernel" in header
    ends = [0] + [t["data_offsets"][1] for t in header.values()]
    assert [t["data_offsets"][0] for t in header.values()] == ends[:-1]  # contiguous, in order
    assert 8 + size + ends[-1] == len(raw)
    names, arrays, metadata = stablehlo.read_weights(tmp_path / "enc.stablehlo.safetensors")
    assert metadata == meta and names == [n for n, _ in expected]
    for a, (_, b) in zip(arrays, expected, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b))
    exp = jax.export.deserialize(bytearray(out.read_bytes()))
    assert [a.shape for a in exp.in_avals[:-1]] == [a.shape for a in arrays]
    assert str(exp.in_avals[-1].shape) == f"(batch, 3, {S}, {S})"
    # Automatic: external above stablehlo.EXTERNAL_WEIGHTS_ABOVE (1.5 GB), inside below it.
    export.save(model, params, tmp_path / "d.stablehlo", "stablehlo", platforms="cpu")
    monkeypatch.setattr(stablehlo, "EXTERNAL_WEIGHTS_ABOVE", 1000)
    written = export.save(model, params, tmp_path / "big.stablehlo", "stablehlo", platforms="cpu")
    assert written == [str(tmp_path / "big.stablehlo"), str(tmp_path / "big.stablehlo.safetensors")]
    forced = export.save(
        model, params, tmp_path / "in.stablehlo", "stablehlo", external_data=False, platforms="cpu"
    )
    assert forced == [str(tmp_path / "in.stablehlo")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big.stablehlo",
        "big.stablehlo.safetensors",
        "d.stablehlo",
        "enc.stablehlo",
        "enc.stablehlo.safetensors",
        "in.stablehlo",
    ]


def test_stablehlo_weights_file_reads_with_safetensors(pair, tmp_path):
    """Any safetensors reader (here the reference implementation's numpy API) loads the file."""
    import safetensors.numpy as st  # the test extra installs it: no skip
    from safetensors import safe_open

    model, params = pair
    out = tmp_path / "d.stablehlo"
    export.save(model, params, out, "stablehlo", external_data=True, platforms="cpu")
    loaded = st.load_file(tmp_path / "d.stablehlo.safetensors")
    expected = dict(stablehlo.weight_arrays(params, "decoder"))
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], np.asarray(value))
    with safe_open(tmp_path / "d.stablehlo.safetensors", "np") as f:
        order = json.loads(f.metadata()["sam_jax.arguments"])
    assert order == [n for n, _ in stablehlo.weight_arrays(params, "decoder")]


def test_stablehlo_external_weights_failures_leave_nothing(pair, tmp_path, monkeypatch):
    model, params = pair
    out = tmp_path / "new" / "enc.stablehlo"

    def save(**kw):
        return export.save(
            model, params, out, "stablehlo", "encoder", external_data=True, platforms="cpu", **kw
        )

    real_write = stablehlo.write_weights

    def broken_weights(f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(stablehlo, "write_weights", broken_weights)
    with pytest.raises(OSError, match="disk full"):
        save()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(stablehlo, "write_weights", real_write)
    # The weights in place, then the graph fails: the weights file goes too.
    real_write_bytes = pathlib.Path.write_bytes

    def broken_graph(self, data):
        if self.name == "enc.stablehlo":
            raise OSError("the graph broke")
        return real_write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", broken_graph)
    with pytest.raises(OSError, match="the graph broke"):
        save()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pathlib.Path, "write_bytes", real_write_bytes)
    # An existing weights file is kept unless overwrite; a serialization failure writes nothing.
    out.parent.mkdir()
    (tmp_path / "new" / "enc.stablehlo.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="exists already"):
        save()
    assert [p.name for p in out.parent.iterdir()] == ["enc.stablehlo.safetensors"]

    def broken_serialize(exported):
        raise ValueError("cannot serialize the export")

    monkeypatch.setattr(stablehlo, "serialize", broken_serialize)
    with pytest.raises(ValueError, match="cannot serialize"):
        save(overwrite=True)
    assert (tmp_path / "new" / "enc.stablehlo.safetensors").read_bytes() == b"old"
    assert [p.name for p in out.parent.iterdir()] == ["enc.stablehlo.safetensors"]
    with pytest.raises(TypeError, match="external_data"):
        export.save(model, params, out, "stablehlo", weights_as_arguments=True)


def test_export_modules_import_neither_onnx_nor_torch():
    code = (
        "import sys, sam_jax.export, sam_jax.export.onnx, sam_jax.export.stablehlo, "
        "sam_jax.cli.export; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ the command


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err, *fragments):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_command_writes_onnx_and_stablehlo(pth, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", pth, "--output"]
    single = [out / "d.onnx", "--format", "onnx", "--return-single-mask"]
    rc, stdout, err = _run([*argv, *single], capsys)
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out / 'd.onnx'}") and "--return-single-mask" in stdout
    sess = ort.InferenceSession(str(out / "d.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(np.random.default_rng(6), 1, (64, 96), False)
    assert sess.run(None, feeds)[0].shape == (1, 1, 64, 96)
    rc, _, err = _run([*argv, out / "e.onnx", "--format", "onnx", "--part", "encoder"], capsys)
    assert rc == 0, err
    rc, _, err = _run(
        [*argv, out / "d.stablehlo", "--format", "stablehlo", "--platforms", "cpu"], capsys
    )
    assert rc == 0, err
    exp = jax.export.deserialize(bytearray((out / "d.stablehlo").read_bytes()))
    assert exp.platforms == ("cpu",)
    enc = [out / "e.stablehlo", "--format", "stablehlo", "--part", "encoder", "--external-data"]
    rc, stdout, err = _run([*argv, *enc, "--platforms", "cpu"], capsys)
    assert rc == 0, err
    assert (
        stdout.startswith(f"wrote {out / 'e.stablehlo'} (")
        and "e.stablehlo.safetensors (" in stdout
    )
    names = ["d.onnx", "d.stablehlo", "e.onnx", "e.stablehlo", "e.stablehlo.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == names
    rc, _, err = _run([*argv, *enc], capsys)  # both files exist: kept unless --force
    assert rc == 1
    _one_line(err, "e.stablehlo exists already", "--force")
    # An existing output is kept unless --force.
    before = (out / "d.onnx").read_bytes()
    rc, _, err = _run([*argv, out / "d.onnx", "--format", "onnx"], capsys)
    assert rc == 1
    _one_line(err, "exists already", "--force")
    assert (out / "d.onnx").read_bytes() == before
    rc, _, err = _run([*argv, out / "d.onnx", "--format", "onnx", "--force"], capsys)
    assert rc == 0, err
    assert (out / "d.onnx").read_bytes() != before  # now 4 masks
    assert sorted(p.name for p in out.iterdir()) == names


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--format", "tflite"], ["invalid choice: 'tflite'"]),
        (
            ["--format", "onnx", "--part", "encoder", "--return-single-mask"],
            ["--return-single-mask: decoder options"],
        ),
        (["--format", "stablehlo", "--return-extra-metrics"], ["needs the ONNX format"]),
        (["--format", "stablehlo", "--opset", "18"], ["--opset applies to --format onnx"]),
        (["--format", "onnx", "--opset", "11"], ["opset must be in 17..21"]),
        (["--format", "onnx", "--platforms", "cpu"], ["--platforms applies"]),
        (["--format", "stablehlo", "--platforms", "gpu0"], ["platforms must be some of"]),
    ],
)
def test_command_usage_errors(pth, tmp_path, capsys, extra, fragments):
    rc, _, err = _run(["--checkpoint", pth, "--output", tmp_path / "x.onnx", *extra], capsys)
    assert rc == 2
    _one_line(err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_command_failures_leave_nothing(pth, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "new" / "d.onnx"
    cases = [  # (argv, exit status, fragments)
        (["--checkpoint", bad, "--output", out], 1, ["bad.pth", "not a PyTorch checkpoint"]),
        (["--checkpoint", tmp_path / "none.pth", "--output", out], 1, ["does not exist"]),
        (["--checkpoint", pth, "--output", tmp_path / "bad.pth" / "d.onnx"], 1, ["d.onnx"]),
        (["--checkpoint", pth, "--output", tmp_path], 1, ["is a folder"]),
        (["--checkpoint", pth, "--output", pth], 2, ["the input --checkpoint"]),
    ]
    for argv, status, fragments in cases:
        rc, _, err = _run([*argv, "--format", "onnx"], capsys)
        assert rc == status, (argv, err)
        _one_line(err, *fragments)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"], argv

    # A failure after the output was opened (here in the graph writer) leaves no partial file.
    def broken(*args, **kwargs):
        raise RuntimeError("the export broke")

    monkeypatch.setattr(onnx_export, "decoder_model", broken)
    rc, _, err = _run(["--checkpoint", pth, "--output", out, "--format", "onnx"], capsys)
    assert rc == 1
    _one_line(err, "the export broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_command_remote_output(pth, gcs, capsys):
    url = gcs.url("export/d.onnx")
    rc, _, err = _run(["--checkpoint", pth, "--format", "onnx", "--output", url], capsys)
    assert rc == 0, err
    from sam_jax import paths

    sess = ort.InferenceSession(paths.read_bytes(url), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(export.signature.DECODER_OUTPUTS)
    # External StableHLO weights need a rename beside the output: refused, nothing written.
    url = gcs.url("export/e.stablehlo")
    argv = ["--checkpoint", pth, "--format", "stablehlo", "--part", "encoder", "--output", url]
    rc, _, err = _run([*argv, "--external-data"], capsys)
    assert rc == 1
    _one_line(err, "external StableHLO weights file needs a local output")
    assert not paths.exists(url) and not paths.exists(url + ".safetensors")
