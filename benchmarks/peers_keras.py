"""keras-hub's SAM (JAX backend) built from a `SamConfig`, its weights set from an official
state_dict, and jitted encoder / prompt-decoder functions for benchmarks/peers.py.

keras-hub has no predictor: `decoder_fn` adds the official post-processing (bilinear to S x S,
crop to the input size, bilinear to the original size, `> 0`) in keras ops, as the official and
transformers predictors do it. Both functions are `jax.jit`s of `stateless_call`, so the weights are
arguments, not constants folded into the executable.

KERAS_BACKEND must be "jax" before keras is first imported (this module sets it if unset).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from collections.abc import Mapping  # noqa: E402

import numpy as np  # noqa: E402


def build(config, state_dict: Mapping[str, np.ndarray], dtype: str | None = None):
    """SAMImageSegmenter with the architecture of `config` and the weights of an official
    state_dict (numpy); dtype: a keras dtype policy ("float32", "mixed_bfloat16", ...; None: the
    global one).

    The layers are built in a `StatelessScope`, which defers the random initialisers (on JAX each
    weight shape would compile one), and every weight is then set from `state_dict`."""
    from keras import StatelessScope
    from keras.src.backend.common import global_state
    from keras_hub.models import SAMImageSegmenter

    kw = {} if dtype is None else {"dtype": dtype}
    with StatelessScope(initialize_variables=False):
        backbone = _backbone(config, kw)
        backbone.mask_decoder.build()  # what the segmenter calls, built here lazily too
    # Every deferred variable gets its value here: none is left for keras to initialise.
    global_state.set_global_attribute("uninitialized_variables", [])
    load_state_dict(backbone, state_dict, config)
    return SAMImageSegmenter(backbone=backbone, **kw)


def _backbone(config, kw):
    from keras_hub.layers import SAMMaskDecoder, SAMPromptEncoder
    from keras_hub.models import SAMBackbone, ViTDetBackbone

    c, s, g = config, config.image_size, config.embedding_size
    if c.attention_downsample_rate != 2:
        raise ValueError("keras-hub's SAM hard-codes attention_downsample_rate 2")
    encoder = ViTDetBackbone(
        hidden_size=c.encoder_embed_dim,
        num_layers=c.encoder_depth,
        intermediate_dim=int(c.encoder_embed_dim * c.mlp_ratio),
        num_heads=c.encoder_num_heads,
        global_attention_layer_indices=list(c.encoder_global_attn_indexes),
        image_shape=(s, s, 3),
        patch_size=c.patch_size,
        num_output_channels=c.prompt_embed_dim,
        window_size=c.window_size,
        **kw,
    )
    prompt_encoder = SAMPromptEncoder(
        hidden_size=c.prompt_embed_dim,
        image_embedding_size=(g, g),
        input_image_size=(s, s),
        mask_in_channels=c.mask_in_chans,
        **kw,
    )
    mask_decoder = SAMMaskDecoder(
        hidden_size=c.prompt_embed_dim,
        num_layers=c.decoder_depth,
        intermediate_dim=c.decoder_mlp_dim,
        num_heads=c.decoder_num_heads,
        embedding_dim=c.prompt_embed_dim,
        num_multimask_outputs=c.num_multimask_outputs,
        iou_head_depth=c.iou_head_depth,
        iou_head_hidden_dim=c.iou_head_hidden_dim,
        **kw,
    )
    return SAMBackbone(
        image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder, **kw
    )


def _dense(layer, sd, key):
    return [(layer.kernel, sd[key + ".weight"].T), (layer.bias, sd[key + ".bias"])]


def _norm(layer, sd, key):
    return [(layer.gamma, sd[key + ".weight"]), (layer.beta, sd[key + ".bias"])]


def _conv(layer, sd, key):
    # torch Conv2d (out, in, kh, kw) -> keras (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw)
    # -> keras Conv2DTranspose (kh, kw, out, in): the same permutation, no spatial flip.
    pairs = [(layer.kernel, sd[key + ".weight"].transpose(2, 3, 1, 0))]
    if layer.use_bias:
        pairs.append((layer.bias, sd[key + ".bias"]))
    return pairs


def _mlp(seq, sd, keys):
    dense = [layer for layer in seq.layers if hasattr(layer, "kernel")]
    if len(dense) != len(keys):
        raise ValueError(f"{keys[0]}: keras has {len(dense)} dense layers, not {len(keys)}")
    return [p for layer, key in zip(dense, keys, strict=True) for p in _dense(layer, sd, key)]


def _layers(key, n):
    return [f"{key}.layers.{i}" for i in range(n)]


def _attention(att, sd, key):
    names = (("query_proj", "q_proj"), ("key_proj", "k_proj"), ("value_proj", "v_proj"))
    pairs = [p for k, t in names for p in _dense(getattr(att, k), sd, f"{key}.{t}")]
    return pairs + _dense(att.out_proj, sd, f"{key}.out_proj")


def _pairs(bb, sd, config):
    """(keras variable, value) for every tensor of the official state_dict `sd`."""
    from keras_hub.src.models.vit_det.vit_layers import (
        AddPositionalEmbedding,
        ViTDetPatchingAndEmbedding,
        WindowedTransformerEncoder,
    )

    enc, pe, md = bb.image_encoder, bb.prompt_encoder, bb.mask_decoder
    of = lambda cls: [layer for layer in enc.layers if isinstance(layer, cls)]  # noqa: E731
    (patch,), (pos,) = of(ViTDetPatchingAndEmbedding), of(AddPositionalEmbedding)
    blocks = of(WindowedTransformerEncoder)
    if len(blocks) != config.encoder_depth:
        raise ValueError(f"keras encoder has {len(blocks)} blocks, expected {config.encoder_depth}")
    e = "image_encoder"
    pairs = _conv(patch.projection, sd, f"{e}.patch_embed.proj")
    pairs.append((pos.pos_embed, sd[f"{e}.pos_embed"]))
    for i, b in enumerate(blocks):
        k = f"{e}.blocks.{i}"
        pairs += _norm(b.layer_norm1, sd, f"{k}.norm1") + _norm(b.layer_norm2, sd, f"{k}.norm2")
        pairs += _dense(b.attention.qkv, sd, f"{k}.attn.qkv")
        pairs += _dense(b.attention.projection, sd, f"{k}.attn.proj")
        rel = b.attention.add_decomposed_relative_pe
        pairs += [
            (rel.rel_pos_h, sd[f"{k}.attn.rel_pos_h"]),
            (rel.rel_pos_w, sd[f"{k}.attn.rel_pos_w"]),
        ]
        pairs += _mlp(b.mlp_block.dense_net, sd, [f"{k}.mlp.lin1", f"{k}.mlp.lin2"])
    neck = enc.neck.layers
    pairs += _conv(neck[0], sd, f"{e}.neck.0") + _norm(neck[1], sd, f"{e}.neck.1")
    pairs += _conv(neck[2], sd, f"{e}.neck.2") + _norm(neck[3], sd, f"{e}.neck.3")

    p = "prompt_encoder"
    gauss = pe.positional_embedding_layer.positional_encoding_gaussian_matrix
    pairs.append((gauss, sd[f"{p}.pe_layer.positional_encoding_gaussian_matrix"]))
    points = (
        pe.background_point_embed,  # label 0
        pe.foreground_point_embed,  # label 1
        pe.top_left_corner_embed,
        pe.bottom_right_corner_embed,
    )
    pairs += [
        (emb.embeddings, sd[f"{p}.point_embeddings.{i}.weight"]) for i, emb in enumerate(points)
    ]
    pairs.append((pe.not_a_point_embed.embeddings, sd[f"{p}.not_a_point_embed.weight"]))
    pairs.append((pe.no_mask_embed.embeddings, sd[f"{p}.no_mask_embed.weight"]))
    ds = pe.mask_downscaler.layers
    for i in (0, 3, 6):
        pairs += _conv(ds[i], sd, f"{p}.mask_downscaling.{i}")
    for i in (1, 4):
        pairs += _norm(ds[i], sd, f"{p}.mask_downscaling.{i}")

    d = "mask_decoder"
    pairs.append((md.iou_token.embeddings, sd[f"{d}.iou_token.weight"]))
    pairs.append((md.mask_tokens.embeddings, sd[f"{d}.mask_tokens.weight"]))
    t = md.transformer
    for i, layer in enumerate(t.layers):
        k = f"{d}.transformer.layers.{i}"
        pairs += _attention(layer.self_attention, sd, f"{k}.self_attn")
        pairs += _attention(
            layer.cross_attention_token_to_image, sd, f"{k}.cross_attn_token_to_image"
        )
        pairs += _attention(
            layer.cross_attention_image_to_token, sd, f"{k}.cross_attn_image_to_token"
        )
        pairs += _mlp(layer.mlp_block.mlp_block, sd, [f"{k}.mlp.lin1", f"{k}.mlp.lin2"])
        for j in range(1, 5):
            pairs += _norm(getattr(layer, f"layer_norm{j}"), sd, f"{k}.norm{j}")
    pairs += _attention(
        t.final_attention_token_to_image, sd, f"{d}.transformer.final_attn_token_to_image"
    )
    pairs += _norm(t.final_layer_norm, sd, f"{d}.transformer.norm_final_attn")
    up, k = md.output_upscaling.layers, f"{d}.output_upscaling"
    pairs += _conv(up[0], sd, f"{k}.0") + _norm(up[1], sd, f"{k}.1") + _conv(up[3], sd, f"{k}.3")
    for i, mlp in enumerate(md.output_hypernetworks_mlps):
        pairs += _mlp(mlp.mlp_block, sd, _layers(f"{d}.output_hypernetworks_mlps.{i}", 3))
    iou = _layers(f"{d}.iou_prediction_head", config.iou_head_depth)
    pairs += _mlp(md.iou_prediction_head.mlp_block, sd, iou)
    return pairs


def load_state_dict(backbone, sd: Mapping[str, np.ndarray], config) -> None:
    """Sets every weight of a SAMBackbone from an official state_dict (numpy); ValueError unless
    each tensor is used and every keras weight is set once."""
    sd = {
        k: np.asarray(v, np.float32) for k, v in sd.items() if k not in ("pixel_mean", "pixel_std")
    }
    used = {}

    class Tracking(dict):
        def __getitem__(self, key):
            used[key] = True
            return super().__getitem__(key)

    pairs = _pairs(backbone, Tracking(sd), config)
    unused = sorted(set(sd) - set(used))
    if unused:
        raise ValueError(f"official tensors not mapped to keras: {unused[:5]}")
    set_ids = {id(v) for v, _ in pairs}
    weights = backbone.weights + backbone.mask_decoder.weights
    missing = [w.path for w in weights if id(w) not in set_ids]
    if missing or len(set_ids) != len(pairs):
        raise ValueError(f"keras weights not set exactly once: {missing[:5]}")
    for var, value in pairs:
        if tuple(var.shape) != value.shape:
            raise ValueError(f"{var.path}: keras shape {tuple(var.shape)}, official {value.shape}")
        var.assign(value)


def to_keras_pixels(x: np.ndarray) -> np.ndarray:
    """Normalised (official / sam_jax) encoder inputs -> the [0, 1] pixels ViTDetBackbone takes
    (it normalises with the ImageNet mean / std, the official PIXEL_MEAN / PIXEL_STD over 255)."""
    from sam_jax.config import PIXEL_MEAN, PIXEL_STD

    mean, std = np.asarray(PIXEL_MEAN, np.float32), np.asarray(PIXEL_STD, np.float32)
    return ((x * std + mean) / 255.0).astype(np.float32)


def _jitted(model, post):
    """`inputs -> post(model outputs)` as one jax.jit of `model.stateless_call`, the model's
    current weights passed as arguments."""
    import jax

    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    call = jax.jit(lambda tv, ntv, inputs: post(model.stateless_call(tv, ntv, inputs)[0]))
    return lambda inputs: call(tv, ntv, inputs)


def encoder_fn(segmenter):
    """images (B, S, S, 3) [0, 1] pixels -> embeddings (B, g, g, D), jitted."""
    return _jitted(segmenter.backbone.image_encoder, lambda y: y)


def decoder_fn(segmenter, input_size, original_size, image_size):
    """(embedding (1, g, g, D), points (P, N, 2) input frame, labels (P, N)) -> bool masks
    (P, 3, H, W) at original_size, iou (P, 3) and low-res logits (P, 3, m, m); jitted."""
    import keras
    from keras import ops

    bb = segmenter.backbone
    pe = bb.prompt_encoder
    emb = keras.Input((*pe.image_embedding_size, pe.hidden_size))
    points, labels = keras.Input((None, 2)), keras.Input((None,))
    out = bb.mask_decoder(image_embeddings=emb, **pe(points=points, labels=labels))
    model = keras.Model([emb, points, labels], [out["masks"], out["iou_pred"]])
    h, w = input_size

    def post(outputs):
        low, iou = outputs[0][:, 1:], outputs[1][:, 1:]  # multimask: masks 1..3, as official
        x = ops.image.resize(
            ops.cast(low, "float32"), (image_size, image_size), data_format="channels_first"
        )
        x = ops.image.resize(x[..., :h, :w], tuple(original_size), data_format="channels_first")
        return x > 0, iou, low

    call = _jitted(model, post)
    return lambda emb, points, labels: call([emb, points, labels])
