"""Coming from segment-anything: the calls of Meta's two example notebooks (predictor_example,
automatic_mask_generator_example) on the official model and, with the same code shape, on
sam_jax, on the same random weights (a tiny config at image_size 128).

The sam_jax side loads through the official loading line, `sam_model_registry["vit_b"]
(checkpoint=...)`, from a .pth of the official model's state_dict; in this module "vit_b" names
the tiny config (the official registry has no tiny size, so the official model comes from
`build_official`). Only the torch-specific lines differ: `torch.tensor(..., device=d)` becomes
`jnp.asarray(..., device=d)` and `.permute` becomes `.transpose`.
"""

import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
from segment_anything import SamPredictor as OfficialPredictor
from segment_anything import sam_model_registry as official_registry
from segment_anything.utils.transforms import ResizeLongestSide as OfficialResize

import sam_jax
from sam_jax import config as config_module
from sam_jax.checkpoints import save_converted, state_dict_to_params
from sam_jax.config import tiny_config
from tests.test_amg_generator import RELAXED, _match
from tests.test_predictor import TOL, assert_masks_match, assert_outputs_match
from tests.torch_reference import build_official, rel_err, state_dict_numpy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
CONFIG = tiny_config()  # 128 px input, 8x8 embedding grid, 32x32 low-res masks
CHELSEA = skimage.data.chelsea()  # 300 x 451
PORTRAIT = np.ascontiguousarray(skimage.data.coffee()[::3, ::3].transpose(1, 0, 2))  # 200 x 134
BOXES = [[60, 40, 380, 280], [150, 20, 300, 140], [10, 150, 200, 290]]  # chelsea pixels


@pytest.fixture(scope="module")
def official():
    return build_official(CONFIG, seed=0)


@pytest.fixture(scope="module")
def tiny_vit_b():
    """For this module, the registry's "vit_b" is the tiny config."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(config_module.MODEL_TYPES, "vit_b", CONFIG)
        yield


@pytest.fixture(scope="module")
def checkpoint(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(official.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam(checkpoint, tiny_vit_b):
    sam = sam_jax.sam_model_registry["vit_b"](checkpoint=str(checkpoint))  # the loading line
    sam.to(device=jax.devices()[0].platform)  # as the notebooks' sam.to(device=device)
    return sam


@pytest.fixture(scope="module")
def predictors(official, sam):
    """(official predictor, ours) with chelsea set, built by the notebooks' lines."""
    op = OfficialPredictor(official)
    with torch.no_grad():
        op.set_image(CHELSEA)
    predictor = sam_jax.SamPredictor(sam)
    predictor.set_image(CHELSEA)
    return op, predictor


def numpy_outputs(outputs):
    return tuple(o.numpy() for o in outputs)


# ----------------------------------------------------------------------------- 1: loading, device


def test_registry_loads_the_official_checkpoint(official, sam, predictors):
    assert (
        set(sam_jax.sam_model_registry)
        == set(official_registry)
        == {
            "default",
            "vit_h",
            "vit_l",
            "vit_b",
        }
    )
    assert isinstance(sam, sam_jax.SamModel) and sam.config == CONFIG
    assert sam.image_encoder.img_size == official.image_encoder.img_size == 128
    assert sam.mask_threshold == official.mask_threshold
    assert sam.image_format == official.image_format
    op, predictor = predictors
    emb = op.get_image_embedding().permute(0, 2, 3, 1).numpy()  # official NCHW, ours NHWC
    assert rel_err(predictor.get_image_embedding(), emb) <= TOL
    assert predictor.original_size == op.original_size and predictor.input_size == op.input_size
    assert "SamModel(image_size=128" in repr(sam) and "params" not in repr(sam)


def test_device(sam, predictors):
    _, predictor = predictors
    assert isinstance(predictor.device, jax.Device)
    assert predictor.device == sam.device
    assert predictor.get_image_embedding().devices() == {predictor.device}
    # torch.tensor(..., device=predictor.device) -> jnp.asarray(..., device=predictor.device)
    boxes = jnp.asarray(BOXES, device=predictor.device)
    assert boxes.devices() == {predictor.device}
    assert sam.to(device=sam.device) is sam and sam.to() is sam
    assert sam_jax.SamPredictor(sam).device == sam.device  # before set_image: the params'
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(ValueError, match="'cuda' is not available to jax"):
            sam.to(device="cuda")
    with pytest.raises(ValueError, match="jax sees"):
        sam.to(device=f"{jax.devices()[0].platform}:{len(jax.devices())}")


def test_random_init_and_converted_checkpoints(official, checkpoint, tiny_vit_b, tmp_path):
    a = sam_jax.sam_model_registry["vit_b"]()  # checkpoint=None: random weights, fixed seed
    b = sam_jax.build_sam_vit_b(checkpoint=None)
    leaves_a, leaves_b = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
    assert len(leaves_a) == len(leaves_b) > 0
    assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))
    params = state_dict_to_params(state_dict_numpy(official), CONFIG)
    save_converted(tmp_path / "conv", CONFIG, params)
    conv = sam_jax.sam_model_registry["vit_b"](checkpoint=tmp_path / "conv")
    flat = jax.tree.leaves(params)
    assert all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(conv.params), flat, strict=True)
    )
    # A checkpoint of another size than the registry key: a one-line error naming both.
    for path in (checkpoint, tmp_path / "conv"):
        with pytest.raises(ValueError, match="holds a vit_b model, not vit_l") as e:
            sam_jax.sam_model_registry["vit_l"](checkpoint=path)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        sam_jax.sam_model_registry["vit_b"](checkpoint=tmp_path / "missing.pth")


def test_sam_model_in_both_constructors(sam):
    model, params = sam.model, sam.params
    direct = sam_jax.SamPredictor(model, params)  # the existing signature still works
    assert direct.model is sam_jax.SamPredictor(sam).model
    with pytest.raises(TypeError, match="takes no params"):
        sam_jax.SamPredictor(sam, params)
    with pytest.raises(TypeError, match=r"SamPredictor\(model, params\)"):
        sam_jax.SamPredictor(model)
    with pytest.raises(TypeError, match="pass the other options by keyword"):
        sam_jax.SamAutomaticMaskGenerator(sam, 32)  # official positional points_per_side
    with pytest.raises(TypeError, match=r"SamAutomaticMaskGenerator\(model, params\)"):
        sam_jax.SamAutomaticMaskGenerator(model, points_per_side=8)
    with pytest.raises(TypeError, match="sam_jax.modeling.Sam"):
        sam_jax.SamModel(object(), params)


# ----------------------------------------------------------------------------- 2: predict_torch


def test_predict_torch_on_transformed_boxes_matches_official(predictors):
    op, predictor = predictors
    image = CHELSEA
    # Official (predictor_example, "Batched prompt inputs").
    input_boxes = torch.tensor(BOXES, device=op.device)
    transformed_boxes = op.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    with torch.no_grad():
        expected = op.predict_torch(
            point_coords=None, point_labels=None, boxes=transformed_boxes, multimask_output=False
        )
        logits = op.predict_torch(None, None, transformed_boxes, None, False, return_logits=True)
    # Ported: only the tensor line differs.
    input_boxes = jnp.asarray(BOXES, device=predictor.device)
    transformed = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    got = predictor.predict_torch(
        point_coords=None, point_labels=None, boxes=transformed, multimask_output=False
    )
    np.testing.assert_array_equal(transformed, transformed_boxes.numpy())  # float32, bit-equal
    assert isinstance(transformed, sam_jax.ResizedCoords) and transformed.dtype == np.float32
    assert got[0].shape == (3, 1, *image.shape[:2]) and got[0].dtype == bool
    assert_outputs_match(got, numpy_outputs(expected), logits[0].numpy())
    # The numpy transform (float64) gives predict_batch's prompts: the same numbers exactly.
    resized = predictor.transform.apply_boxes(np.array(BOXES), image.shape[:2])
    same = predictor.predict_torch(boxes=resized, multimask_output=False)
    ref = predictor.predict_batch(boxes=np.array(BOXES), multimask_output=False)
    for a, b in zip(same, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_predict_torch_points_and_masks_from_torch_tensors(predictors):
    """Torch tensors (torch imported by the user) are taken as they are, converted."""
    op, predictor = predictors
    size = CHELSEA.shape[:2]
    rng = np.random.default_rng(0)
    coords = torch.tensor(rng.uniform(0, 1, (3, 2, 2)) * [451, 300], dtype=torch.float)
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]], dtype=torch.int)  # -1: padding point
    with torch.no_grad():
        first = op.predict_torch(op.transform.apply_coords_torch(coords, size), labels)
        mask_input = first[2][:, :1]  # (B, 1, m, m) low-res logits fed back
        kw = dict(mask_input=mask_input, multimask_output=True)
        pc = op.transform.apply_coords_torch(coords, size)
        expected = numpy_outputs(op.predict_torch(pc, labels, **kw))
        logits = op.predict_torch(pc, labels, return_logits=True, **kw)[0].numpy()
    ours_pc = predictor.transform.apply_coords_torch(coords, size)
    np.testing.assert_array_equal(ours_pc, pc.numpy())
    got = predictor.predict_torch(ours_pc, labels, **kw)
    assert got[0].shape == (3, 3, *size) and got[1].shape == (3, 3) and got[2].shape[-1] == 32
    assert_outputs_match(got, expected, logits)
    # float32 torch arithmetic on random coordinates and sizes: bit-equal to the official.
    for hw in [(300, 451), (1200, 1800), (77, 1000), (513, 97)]:
        c = torch.tensor(rng.uniform(0, 2000, (50, 2)), dtype=torch.float)
        t = OfficialResize(1024)
        ours = sam_jax.ResizeLongestSide(1024)
        np.testing.assert_array_equal(ours.apply_coords_torch(c, hw), t.apply_coords_torch(c, hw))
        np.testing.assert_array_equal(
            ours.apply_coords(c.numpy(), hw), t.apply_coords(c.numpy(), hw)
        )


def test_set_torch_image_matches_official(official, sam, predictors):
    op0, _ = predictors
    t = OfficialResize(official.image_encoder.img_size)
    resized = t.apply_image(PORTRAIT)
    op = OfficialPredictor(official)
    with torch.no_grad():
        op.set_torch_image(
            torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None], PORTRAIT.shape[:2]
        )
    predictor = sam_jax.SamPredictor(sam)
    predictor.set_torch_image(jnp.asarray(resized).transpose(2, 0, 1)[None], PORTRAIT.shape[:2])
    emb = op.get_image_embedding().permute(0, 2, 3, 1).numpy()
    assert rel_err(predictor.get_image_embedding(), emb) <= TOL
    assert predictor.input_size == op.input_size == resized.shape[:2]
    box = np.array([20, 30, 110, 170])
    with torch.no_grad():
        expected = op.predict(box=box, multimask_output=False)
        logits = op.predict(box=box, multimask_output=False, return_logits=True)[0]
    assert_outputs_match(predictor.predict(box=box, multimask_output=False), expected, logits)
    with pytest.raises(ValueError, match="not an image of original_size"):
        predictor.set_torch_image(jnp.asarray(resized).transpose(2, 0, 1)[None], (300, 451))
    with pytest.raises(ValueError, match=r"\(1, 3, h, w\)"):
        predictor.set_torch_image(resized, PORTRAIT.shape[:2])
    del op0


def test_resized_coords_are_refused_in_the_original_frame(predictors):
    """The silent trap of the official API: apply_boxes output passed where original pixels go."""
    _, predictor = predictors
    size = CHELSEA.shape[:2]
    boxes = predictor.transform.apply_boxes(np.array(BOXES), size)
    coords = predictor.transform.apply_coords(np.array([[[200.0, 150.0]]]), size)
    cases = [
        (lambda: predictor.predict_batch(boxes=boxes), "apply_boxes to the 128-px input frame"),
        (
            lambda: predictor.predict_batch(
                boxes=predictor.transform.apply_boxes_torch(BOXES, size)
            ),
            "pass them to predict_torch, or pass original-image pixels to predict_batch",
        ),
        (lambda: predictor.predict(box=boxes[0]), "original-image pixels to predict$"),
        (
            lambda: predictor.predict_batch(coords, np.ones((1, 1))),
            "point_coords were mapped by transform.apply_coords",
        ),
        (lambda: predictor.predict(coords[0], np.ones(1)), "apply_coords"),
        (lambda: predictor.transform.apply_boxes(boxes, size), "already in the 128-px"),
        (
            lambda: predictor.predict_torch(
                boxes=sam_jax.ResizeLongestSide(1024).apply_boxes(np.array(BOXES), size)
            ),
            r"1024-px frame but the model input is 128 px: .*ResizeLongestSide\(128\)",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    # Tags survive slicing and pickling; np.array drops them (then plain input-frame numbers).
    assert boxes[1:].target_length == 128 and type(np.array(boxes)) is np.ndarray
    assert pickle.loads(pickle.dumps(boxes)).target_length == 128
    with pytest.raises(ValueError, match=r"1 \(foreground\) or 0 \(background\)$"):
        predictor.predict_batch(np.zeros((1, 1, 2)), -np.ones((1, 1)))  # -1: predict_torch only


# ----------------------------------------------------------------------------- 3: Sam.forward


def test_end_to_end_batched_input_matches_official(official, sam):
    rng = np.random.default_rng(1)
    low_res = (rng.normal(size=(2, 1, 32, 32)) * 2).astype(np.float32)
    portrait_points = [[[60, 80], [100, 150]], [[30, 40], [70, 20]]]

    # Official (predictor_example, "End-to-end batched inference").
    resize_transform = OfficialResize(official.image_encoder.img_size)

    def prepare_image(image, transform, device):
        image = transform.apply_image(image)
        image = torch.as_tensor(image, device=device.device)
        return image.permute(2, 0, 1).contiguous()

    batched_input = [
        {
            "image": prepare_image(CHELSEA, resize_transform, official),
            "boxes": resize_transform.apply_boxes_torch(
                torch.tensor(BOXES, device=official.device), CHELSEA.shape[:2]
            ),
            "original_size": CHELSEA.shape[:2],
        },
        {
            "image": prepare_image(PORTRAIT, resize_transform, official),
            "point_coords": resize_transform.apply_coords_torch(
                torch.tensor(portrait_points, device=official.device), PORTRAIT.shape[:2]
            ),
            "point_labels": torch.tensor([[1, 0], [1, 1]], device=official.device),
            "mask_inputs": torch.from_numpy(low_res),
            "original_size": PORTRAIT.shape[:2],
        },
        {  # no prompt: one prompt-free mask
            "image": prepare_image(CHELSEA[:90, :60], resize_transform, official),
            "original_size": (90, 60),
        },
    ]

    # Ported: the same lines with jnp for torch.
    resize = sam_jax.ResizeLongestSide(sam.image_encoder.img_size)

    def prepare_image_jax(image, transform, device):
        image = transform.apply_image(image)
        image = jnp.asarray(image, device=device.device)
        return image.transpose(2, 0, 1)

    ported_input = [
        {
            "image": prepare_image_jax(CHELSEA, resize, sam),
            "boxes": resize.apply_boxes_torch(
                jnp.asarray(BOXES, device=sam.device), CHELSEA.shape[:2]
            ),
            "original_size": CHELSEA.shape[:2],
        },
        {
            "image": prepare_image_jax(PORTRAIT, resize, sam),
            "point_coords": resize.apply_coords_torch(
                jnp.asarray(portrait_points, device=sam.device), PORTRAIT.shape[:2]
            ),
            "point_labels": jnp.asarray([[1, 0], [1, 1]], device=sam.device),
            "mask_inputs": low_res,
            "original_size": PORTRAIT.shape[:2],
        },
        {"image": prepare_image_jax(CHELSEA[:90, :60], resize, sam), "original_size": (90, 60)},
    ]
    for multimask in (False, True):
        with torch.no_grad():
            expected = official(batched_input, multimask_output=multimask)
        got = sam(ported_input, multimask_output=multimask)
        assert len(got) == len(expected) == 3
        c = 3 if multimask else 1
        for rec, ours, theirs in zip(batched_input, got, expected, strict=True):
            assert set(ours) == set(theirs) == {"masks", "iou_predictions", "low_res_logits"}
            with torch.no_grad():
                logits = official.postprocess_masks(
                    theirs["low_res_logits"], rec["image"].shape[-2:], rec["original_size"]
                ).numpy()
            b = theirs["masks"].shape[0]
            assert ours["masks"].shape == (b, c, *rec["original_size"])
            assert ours["low_res_logits"].shape == (b, c, 32, 32)
            assert rel_err(ours["low_res_logits"], theirs["low_res_logits"].numpy()) <= TOL
            np.testing.assert_allclose(
                ours["iou_predictions"], theirs["iou_predictions"].numpy(), rtol=0, atol=TOL
            )
            assert_masks_match(ours["masks"], logits)


def test_forward_input_errors(sam):
    image = np.zeros((3, 85, 128), np.uint8)  # a 300 x 451 image resized to 128
    ok = {"image": image, "original_size": (300, 451)}
    cases = [
        ({**ok, "box": np.zeros((1, 4))}, ValueError, "unknown keys"),
        ({"image": image}, ValueError, "needs original_size"),
        ({**ok, "image": image.transpose(1, 2, 0)}, ValueError, r"must be \(3, H, W\)"),
        ({**ok, "original_size": (451, 300)}, ValueError, "not an image of original_size"),
        ({**ok, "point_coords": np.zeros((1, 1, 2))}, ValueError, "point_labels must be"),
        (
            {**ok, "boxes": np.zeros((2, 4)), "mask_inputs": np.zeros((1, 1, 32, 32))},
            ValueError,
            "disagree",
        ),
        ({**ok, "mask_inputs": np.zeros((1, 1, 64, 64))}, ValueError, r"\(B, 1, 32, 32\)"),
    ]
    for record, error, message in cases:
        with pytest.raises(error, match=message) as e:
            sam([record], multimask_output=False)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="list of dicts"):
        sam(ok, multimask_output=False)


def test_preprocess_and_postprocess_masks_match_official(official, sam):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 3, 85, 128)).astype(np.uint8)
    with torch.no_grad():
        expected = official.preprocess(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(sam.preprocess(x), expected)
    low = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = official.postprocess_masks(torch.from_numpy(low), (85, 128), (300, 451))
    got = sam.postprocess_masks(low, (85, 128), (300, 451))
    assert got.shape == (2, 3, 300, 451)
    assert rel_err(got, expected.numpy()) <= TOL


# ----------------------------------------------------------------------------- 4: AMG


@pytest.fixture(scope="module")
def amg_image():
    rng = np.random.default_rng(0)
    img = np.full((192, 240, 3), 40, np.uint8)
    img[10:50, 20:70] = [200, 30, 30]
    img[55:90, 60:110] = [30, 200, 60]
    yy, xx = np.mgrid[:192, :240]
    img[(yy - 30) ** 2 + (xx - 95) ** 2 < 150] = [20, 40, 220]
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


def test_automatic_mask_generator_from_sam_matches_official(official, sam, amg_image):
    theirs = OfficialGenerator(model=official, **RELAXED).generate(amg_image)
    mask_generator = sam_jax.SamAutomaticMaskGenerator(model=sam, **RELAXED)
    ours = mask_generator.generate(amg_image)
    assert len(ours) >= 2
    _match(theirs, ours)
    from_tensor = mask_generator.generate(torch.from_numpy(amg_image))  # converted
    assert [r["bbox"] for r in from_tensor] == [r["bbox"] for r in ours]
    default = sam_jax.SamAutomaticMaskGenerator(
        sam
    )  # mask_generator = SamAutomaticMaskGenerator(sam)
    assert default.model is sam.model and len(default.point_grids[0]) == 32 * 32


def test_porting_layer_does_not_import_torch():
    code = (
        "import sys, numpy as np, sam_jax; "
        "t = sam_jax.ResizeLongestSide(1024); t.apply_boxes_torch(np.ones((1, 4)), (10, 20)); "
        "sam_jax.sam_model_registry, sam_jax.SamPredictor, sam_jax.SamAutomaticMaskGenerator; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
