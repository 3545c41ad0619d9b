"""transformers (Hugging Face) SAM checkpoints: a `SamModel` directory or Hub id loads with
`sam_jax.load` and computes what transformers computes; `--to-hf` writes a directory that
transformers loads back unchanged; bad input fails in one typed line."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sam_jax
from convert_weights import main as convert_main
from sam_jax import checkpoints
from sam_jax.checkpoints import hf
from sam_jax.checkpoints.mapping import flatten_params
from sam_jax.config import SamConfig, tiny_config
from sam_jax.errors import CheckpointError
from sam_jax.prompts import pack_prompts
from tests.torch_reference import build_official

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot of the fake Hub cache
# A small SAM with every kind of layer: windowed and global blocks, an MLP ratio of 1.5, a
# 3-layer IoU head (proj_in, layers.0, proj_out), 2 decoder blocks, 4 decoder heads.
VISION = dict(
    hidden_size=48, output_channels=32, num_hidden_layers=3, num_attention_heads=2,
    image_size=96, patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=16,
    mlp_dim=72,
)  # fmt: skip
PROMPT = dict(hidden_size=32, image_size=96, patch_size=16, mask_input_channels=8)
DECODER = dict(hidden_size=32, mlp_dim=40, num_attention_heads=4, iou_head_hidden_dim=24)
EXPECTED = SamConfig(
    image_size=96,
    encoder_embed_dim=48,
    encoder_depth=3,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=4,
    mlp_ratio=1.5,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_mlp_dim=40,
    decoder_num_heads=4,
    iou_head_hidden_dim=24,
    decoder_layer_norm_eps=1e-6,  # transformers' default, read from config.json
)


def _hf_model(seed: int = 0):
    """A transformers SamModel with random weights and O(1) activations, as a trained model
    has: weight matrices N(0, 1/fan_in), embeddings N(0, 1) (as the official init), every other
    tensor perturbed (the rel-pos tables and position embedding are zeros at init)."""
    from transformers import SamConfig as HFConfig
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel(
        HFConfig(vision_config=VISION, prompt_encoder_config=PROMPT, mask_decoder_config=DECODER)
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if re.search(r"(embed(\.\d)?|tokens?)\.weight$|positional_embedding$", name):
                p.copy_(noise)
            elif p.ndim >= 2 and name.endswith("weight"):
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.add_(0.05 * noise)
    pe = model.prompt_encoder.shared_embedding.positional_embedding
    assert torch.equal(pe, model.shared_image_embedding.positional_embedding)  # tied
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    model = _hf_model()
    path = tmp_path_factory.mktemp("hf") / "tiny-sam"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return sam_jax.load(hf_dir[1])


def _rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _decode(model, params, emb, points, labels, mask=None, multimask=True):
    has = None if mask is None else np.ones(labels.shape[:2], bool)
    fn = jax.jit(
        lambda p, e, pt, lb, m, h: model.apply(
            {"params": p}, e, pt, lb, m, h, multimask, method=model.decode
        )
    )
    return [np.asarray(x) for x in fn(params, emb, points, labels, mask, has)]


def test_the_rename_table_names_every_transformers_tensor(hf_dir):
    model, _ = hf_dir
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = hf.hf_keys(EXPECTED)
    leaves = checkpoints.mapping.expected_leaves(EXPECTED)
    assert len(set(names.values())) == len(names)
    assert set(names.values()) == set(found) - {hf.TIED_PE_KEY}
    assert all(found[names[k]] == leaf.torch_shape for k, leaf in leaves.items())


def test_load_matches_transformers(hf_dir, loaded):
    """Image embeddings, masks and IoU predictions of points, boxes and a mask prompt, against
    transformers' own forward pass (relative error <= 1e-4)."""
    hf_model, _ = hf_dir
    model, params = loaded
    assert model.config == EXPECTED
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref_emb = hf_model.get_image_embeddings(torch.from_numpy(images))
    emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
        params, images.transpose(0, 2, 3, 1)
    )
    emb = np.asarray(emb)
    assert _rel(emb, ref_emb.permute(0, 2, 3, 1).numpy()) <= 1e-4

    coords = rng.uniform(0, 96, size=(2, 2, 2)).astype(np.float32)  # P=2 prompts of 2 points
    labels = np.array([[1, 0], [1, -1]], np.int32)
    boxes = np.array([[10, 12, 60, 70], [30, 5, 90, 40]], np.float32)
    mask = rng.normal(size=(1, 1, 24, 24)).astype(np.float32)
    cases = [  # (transformers kwargs, sam_jax prompts, mask, multimask)
        (dict(input_points=coords[None], input_labels=labels[None]), dict(point_coords=coords,
         point_labels=labels), None, True),
        (dict(input_points=coords[None, :, :1], input_labels=labels[None, :, :1],
         input_boxes=boxes[None]), dict(point_coords=coords[:, :1], point_labels=labels[:, :1],
         boxes=boxes), None, False),
        (dict(input_boxes=boxes[None, :1], input_masks=mask), dict(boxes=boxes[:1]), mask, True),
    ]  # fmt: skip
    for hf_kwargs, prompts, mask_in, multimask in cases:
        points, point_labels = pack_prompts(**prompts)
        masks, iou = _decode(
            model, params, emb[:1], points[None], point_labels[None], mask_in, multimask
        )
        # Only float rounding is left, which shows that every tensor lands where it belongs.
        with torch.no_grad():
            out = hf_model(
                image_embeddings=ref_emb[:1],
                multimask_output=multimask,
                **{k: torch.from_numpy(v) for k, v in hf_kwargs.items()},
            )
        assert masks.shape == tuple(out.pred_masks.shape)
        assert _rel(masks, out.pred_masks.numpy()) <= 1e-5
        assert _rel(iou, out.iou_scores.numpy()) <= 1e-5


def test_layer_norm_epsilons_come_from_config_json(tmp_path):
    """A model whose decoder activations are small (as after fine-tuning, where a LayerNorm's
    input variance can be near its eps) computes what transformers computes only with the
    epsilons of its config.json (decoder 1e-7, prompt encoder 1e-4 here; official 1e-5 and
    1e-6): sam_jax reads them, and `--to-hf` writes them back."""
    from transformers import SamConfig as HFConfig
    from transformers import SamModel

    hf_model = _hf_model(seed=3)
    config = HFConfig(
        vision_config=VISION,
        prompt_encoder_config={**PROMPT, "layer_norm_eps": 1e-4},
        mask_decoder_config={**DECODER, "layer_norm_eps": 1e-7},
    )
    model = SamModel(config).eval()
    model.load_state_dict(hf_model.state_dict())
    with torch.no_grad():  # first-block self-attention output (no residual) of variance ~1e-8
        model.mask_decoder.transformer.layers[0].self_attn.out_proj.weight.mul_(1e-4)
        model.mask_decoder.transformer.layers[0].self_attn.out_proj.bias.mul_(1e-4)
        model.prompt_encoder.mask_embed.conv1.weight.mul_(1e-2)
    model.save_pretrained(tmp_path / "small")
    loaded_model, params = sam_jax.load(tmp_path / "small")
    c = loaded_model.config
    assert (c.decoder_layer_norm_eps, c.prompt_layer_norm_eps) == (1e-7, 1e-4)
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(1, 32, 6, 6)).astype(np.float32)
    coords = np.array([[[20.0, 30.0]]], np.float32)
    labels = np.ones((1, 1), np.int32)
    mask = rng.normal(size=(1, 1, 24, 24)).astype(np.float32)
    with torch.no_grad():
        out = model(
            image_embeddings=torch.from_numpy(emb),
            input_points=torch.from_numpy(coords[None]),
            input_labels=torch.from_numpy(labels[None]),
            input_masks=torch.from_numpy(mask),
        )
    points, point_labels = pack_prompts(coords, labels)
    masks, iou = _decode(
        loaded_model, params, emb.transpose(0, 2, 3, 1), points[None], point_labels[None], mask
    )
    assert _rel(masks, out.pred_masks.numpy()) <= 1e-5
    assert _rel(iou, out.iou_scores.numpy()) <= 1e-5
    # With the official epsilons the same weights compute something else.
    official = loaded_model.clone(config=c.replace(decoder_layer_norm_eps=1e-5))
    off_masks, _ = _decode(
        official, params, emb.transpose(0, 2, 3, 1), points[None], point_labels[None], mask
    )
    assert _rel(off_masks, out.pred_masks.numpy()) > 1e-2
    # Written back, transformers reads the same epsilons.
    argv = ["--checkpoint", str(tmp_path / "small"), "--to-hf", str(tmp_path / "back")]
    assert convert_main(argv) == 0
    doc = json.loads((tmp_path / "back" / hf.CONFIG_FILE).read_text())
    assert doc["mask_decoder_config"]["layer_norm_eps"] == 1e-7
    assert doc["prompt_encoder_config"]["layer_norm_eps"] == 1e-4


def test_sharded_bin_and_bfloat16_directories_give_the_same_params(hf_dir, loaded, tmp_path):
    hf_model, path = hf_dir
    want = {k: np.asarray(v) for k, v in flatten_params(loaded[1]).items()}
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX).is_file()
    (tmp_path / "bin").mkdir()
    shutil.copy(path / hf.CONFIG_FILE, tmp_path / "bin")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / hf.BIN)  # with the tied copy too
    for name in ("sharded", "bin"):
        config, params = checkpoints.read_checkpoint(tmp_path / name)
        assert config == EXPECTED
        got = flatten_params(params)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want), name
    tensors = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    (tmp_path / "bf16").mkdir()
    shutil.copy(path / hf.CONFIG_FILE, tmp_path / "bf16")
    from safetensors.torch import save_file as save_torch

    save_torch(
        {k: v for k, v in tensors.items() if k != hf.TIED_PE_KEY},
        tmp_path / "bf16" / hf.SAFETENSORS,
        metadata={"format": "pt"},
    )
    got = flatten_params(checkpoints.read_checkpoint(tmp_path / "bf16")[1])
    key = ("image_encoder", "blocks_0", "mlp", "lin1", "kernel")
    assert got[key].dtype == np.float32
    bf16 = tensors["vision_encoder.layers.0.mlp.lin1.weight"].float().numpy().T
    assert np.array_equal(got[key], bf16) and not np.array_equal(got[key], want[key])


def _hf_outputs(model, seed=1):
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 96, 96)).astype(np.float32))
    points = torch.from_numpy(rng.uniform(0, 96, size=(1, 2, 3, 2)).astype(np.float32))
    labels = torch.tensor([[[1, 0, 1], [1, 1, -1]]])
    with torch.no_grad():
        out = model(pixel_values=pixels, input_points=points, input_labels=labels)
    return out.pred_masks, out.iou_scores


def test_to_hf_round_trip_loads_back_unchanged_in_transformers(hf_dir, tmp_path, capsys):
    """transformers dir -> --to-hf, and -> converted -> --to-hf: both load back in transformers
    with identical tensors and identical outputs; nothing else is written."""
    from transformers import SamModel

    hf_model, path = hf_dir
    assert convert_main(["--checkpoint", str(path), "--to-hf", str(tmp_path / "a")]) == 0
    assert convert_main(["--checkpoint", str(path), "--output", str(tmp_path / "conv")]) == 0
    argv = ["--checkpoint", str(tmp_path / "conv"), "--to-hf", str(tmp_path / "b")]
    assert convert_main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "conv"]
    files = sorted([hf.CONFIG_FILE, hf.SAFETENSORS, hf.PREPROCESSOR_FILE])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == files
    ref = _hf_outputs(hf_model)
    for name in ("a", "b"):
        back = SamModel.from_pretrained(tmp_path / name).eval()
        assert back.state_dict().keys() == hf_model.state_dict().keys()
        for k, v in hf_model.state_dict().items():
            assert back.state_dict()[k].dtype == torch.float32 and torch.equal(
                back.state_dict()[k], v
            ), k
        out = _hf_outputs(back)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # Existing output: refused without --force, replaced with it.
    assert convert_main(["--checkpoint", str(path), "--to-hf", str(tmp_path / "a")]) == 1
    assert "exists already" in capsys.readouterr().err
    assert convert_main(["--checkpoint", str(path), "--to-hf", str(tmp_path / "a"), "--force"]) == 0


def test_to_hf_processor_prepares_images_as_sam_jax_does(hf_dir, tmp_path):
    """--to-hf writes the preprocessor config: transformers' SamProcessor loads from the directory
    alone and turns images (square, and one resized and padded) into the pixels sam_jax's own
    preprocessing gives, for the checkpoint's image size."""
    from transformers import SamProcessor

    from sam_jax import transforms

    _, path = hf_dir
    assert convert_main(["--checkpoint", str(path), "--to-hf", str(tmp_path / "a")]) == 0
    processor = SamProcessor.from_pretrained(tmp_path / "a")
    size = sam_jax.load(tmp_path / "a")[0].config.image_size
    rng = np.random.default_rng(0)
    for shape in [(size, size, 3), (size // 2, size * 3 // 4, 3)]:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        pixels = processor(images=image, return_tensors="np")["pixel_values"][0]
        ours, input_size = transforms.preprocess_image(image, size)
        assert pixels.shape == (3, size, size)
        assert list(processor(images=image)["reshaped_input_sizes"][0]) == list(input_size)
        # PIL's bilinear resize rounds to uint8 as the official ResizeLongestSide does
        np.testing.assert_allclose(pixels.transpose(1, 2, 0), ours, atol=1e-5)


def test_official_pth_to_hf_computes_what_segment_anything_computes(tmp_path):
    """official .pth -> --to-hf -> transformers, against segment_anything itself: checks the
    rename table against two independent implementations, without sam_jax's model."""
    from transformers import SamModel

    config = tiny_config(decoder_num_heads=8)
    official = build_official(config, seed=5)
    torch.save(official.state_dict(), tmp_path / "tiny.pth")
    argv = ["--checkpoint", str(tmp_path / "tiny.pth"), "--to-hf", str(tmp_path / "hf")]
    assert convert_main(argv) == 0
    back = SamModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 128, 128)))
    points = torch.tensor([[[30.0, 40.0], [90.0, 20.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        emb = official.image_encoder(images.float())
        sparse, dense = official.prompt_encoder((points, labels), None, None)
        masks, iou = official.mask_decoder(
            emb, official.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
        hf_emb = back.get_image_embeddings(images.float())
        out = back(image_embeddings=hf_emb, input_points=points[None], input_labels=labels[None])
    assert _rel(hf_emb, emb) <= 1e-5
    assert _rel(out.pred_masks[0], masks) <= 1e-5  # the official decoder eps, written out
    assert _rel(out.iou_scores[0], iou) <= 1e-5


# ------------------------------------------------------------------------- Hub ids


def _fill_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """huggingface_hub's cache layout: blobs, a snapshot of relative links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, src in files.items():  # blobs are named by their SHA-256 (git's SHA-1 for config)
        data = Path(src).read_bytes()
        blob = hashlib.sha256(data).hexdigest() if name != hf.CONFIG_FILE else "c0" * 20
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))


class _NotFoundHub(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint that knows no repository (as huggingface.co answers for one)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_runs(hf_dir, tmp_path_factory):
    """{case: (returncode, stderr, output dir)}: sam-jax-convert in subprocesses (as a user runs
    it) with a Hub id, two at a time; the Hub cache and endpoint come from the environment."""
    root = tmp_path_factory.mktemp("hub")
    _, path = hf_dir
    _fill_hub_cache(root / "cache", "acme/tiny-sam", {n: path / n for n in os.listdir(path)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHub)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    offline = {"HF_HUB_OFFLINE": "1"}
    cases = {  # name: (hub id, environment)
        "cached": ("acme/tiny-sam", offline),
        "offline-missing": ("acme/missing-sam", offline),
        "not-found": (
            "acme/no-such-sam",
            {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"},
        ),
    }

    def run(name):
        repo_id, extra = cases[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HUB_CACHE=str(root / "cache"), HF_HUB_DISABLE_TELEMETRY="1", **extra)
        out = root / f"out-{name}"
        code = "import sys; from sam_jax.cli.convert import main; sys.exit(main())"
        proc = subprocess.run(
            [sys.executable, "-c", code, "--checkpoint", repo_id, "--to-hf", str(out)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )
        return name, (proc.returncode, proc.stderr, out)

    try:
        with ThreadPoolExecutor(2) as pool:
            results = dict(pool.map(run, cases))
    finally:
        server.shutdown()
        server.server_close()
    return results, root / "cache"


def test_hub_id_loads_from_the_cache_offline(cli_runs, hf_dir):
    from huggingface_hub import scan_cache_dir

    (rc, err, out), cache = cli_runs[0]["cached"], cli_runs[1]
    assert rc == 0, err
    repo = {r.repo_id: r for r in scan_cache_dir(cache).repos}["acme/tiny-sam"]  # a real cache
    assert {f.file_name for f in next(iter(repo.revisions)).files} == {
        hf.CONFIG_FILE,
        hf.SAFETENSORS,
    }
    want = {k: v.numpy() for k, v in hf_dir[0].state_dict().items() if k != hf.TIED_PE_KEY}
    got = load_file(out / hf.SAFETENSORS)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("offline-missing", ["acme/missing-sam", "not in the Hugging Face cache", "HF_HUB_OFFLINE",
                             "models--acme--missing-sam", "hf download"]),
        ("not-found", ["acme/no-such-sam", "does not exist on the Hugging Face Hub"]),
    ],
)  # fmt: skip
def test_hub_id_errors_are_one_line(cli_runs, case, fragments):
    (rc, err, out), cache = cli_runs[0][case], cli_runs[1]
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("sam-jax-convert: error: checkpoint acme/"), lines[0]
    for fragment in fragments + ([str(cache)] if case == "offline-missing" else []):
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        sam_jax.load("acme/tiny-sam")
    assert "not in the Hugging Face cache" in str(e.value) and "cannot be reached" in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------- bad directories


def _copy_with(src: Path, dst: Path, config=None, tensors=None) -> Path:
    dst.mkdir()
    doc = json.loads((src / hf.CONFIG_FILE).read_text())
    (dst / hf.CONFIG_FILE).write_text(json.dumps(config(doc) if config else doc))
    if tensors is not None:
        save_file(tensors(load_file(src / hf.SAFETENSORS)), dst / hf.SAFETENSORS)
    return dst


def test_bad_directories_are_one_typed_line(hf_dir, tmp_path):
    _, path = hf_dir

    def drop(t):
        return {k: v for k, v in t.items() if ".iou_prediction_head." not in k}

    cases = [
        (_copy_with(path, tmp_path / "bert", config=lambda d: {**d, "model_type": "bert"}),
         ["bert", "not a SAM", "model_type 'bert'"]),
        (_copy_with(path, tmp_path / "noweights"), ["has no weights", "model.safetensors"]),
        (_copy_with(path, tmp_path / "missing", tensors=drop),
         ["6 missing keys", "mask_decoder.iou_prediction_head.proj_in.weight", "(2 more)"]),
        (_copy_with(path, tmp_path / "no-rel-pos", config=lambda d: {**d, "vision_config": {
            **d["vision_config"], "use_rel_pos": False}}), ["use_rel_pos=False"]),
    ]  # fmt: skip
    for folder, fragments in cases:
        with pytest.raises(CheckpointError) as e:
            sam_jax.load(folder)
        message = str(e.value)
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def test_to_hf_flag_conflicts_exit_2(hf_dir, tmp_path, capsys):
    _, path = hf_dir
    cases = [
        (["--to-hf", tmp_path / "a", "--output", tmp_path / "b"], "takes the place of --output"),
        (["--to-hf", tmp_path / "a", "--to-pytorch"], "takes the place of --output"),
        (["--output", tmp_path / "b", "--model-type", "vit_b"], "apply to .pth input only"),
    ]
    for argv, fragment in cases:
        rc = convert_main(["--checkpoint", str(path), *map(str, argv)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_fine_tuning_starts_from_a_transformers_folder(hf_dir, loaded, tmp_path):
    """config.init.path takes a transformers folder: the architecture and the frozen encoder come
    from it, and the exported model keeps that encoder bit for bit."""
    from sam_jax.checkpoints import load_converted
    from sam_jax.training import train_loop
    from tests.training_fakes import fake_iterator, tiny_train_config

    config = tiny_train_config()
    config.init.type, config.init.path = "sam", str(hf_dir[1])
    config.model_overrides = type(config.model_overrides)()  # the architecture is the folder's
    config.trainable, config.total_steps, config.embedding_cache = "mask_decoder", 1, "off"
    train_loop.train_and_evaluate(config, str(tmp_path / "ft"), fake_iterator)
    sam, exported = load_converted(str(tmp_path / "ft" / "model"))
    hf_params = jax.tree.map(np.asarray, loaded[1])
    assert sam.encoder_embed_dim == EXPECTED.encoder_embed_dim
    jax.tree.map(
        np.testing.assert_array_equal, exported["image_encoder"], hf_params["image_encoder"]
    )


def test_hub_cache_blobs_are_verified_and_a_plain_folder_warns_once(hf_dir, tmp_path, caplog):
    """4 KiB overwritten in model.safetensors: the Hub cache names the blob by its SHA-256, so
    the damage is refused; a plain folder has no checksum, which is said once per folder."""
    _, path = hf_dir
    files = {name: path / name for name in (hf.CONFIG_FILE, hf.SAFETENSORS)}
    _fill_hub_cache(tmp_path / "cache", "acme/tiny-sam", files)
    snapshot = tmp_path / "cache" / "models--acme--tiny-sam" / "snapshots" / COMMIT
    config, params = checkpoints.read_checkpoint(snapshot)  # intact: verified, no warning
    assert config == EXPECTED and not caplog.records
    blob = (snapshot / hf.SAFETENSORS).resolve()
    data = bytearray(blob.read_bytes())
    data[-8192:-4096] = bytes(4096)  # inside the last tensor's values: still a valid file
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        checkpoints.read_checkpoint(snapshot)
    assert "is damaged: its SHA-256" in str(e.value) and "\n" not in str(e.value)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(snapshot / hf.CONFIG_FILE, plain)
    shutil.copy(blob, plain / hf.SAFETENSORS)
    for _ in range(2):
        checkpoints.read_checkpoint(plain)  # the damage cannot be seen here
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot be verified" in warnings[0] and str(plain) in warnings[0]


def test_a_folder_that_is_no_checkpoint_names_what_is_missing(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / hf.SAFETENSORS).write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        sam_jax.load(tmp_path / "weights")
    message = str(e.value)
    assert "config.json" in message and "config/metadata" in message and "\n" not in message
