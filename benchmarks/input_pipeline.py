"""SA-1B input pipeline throughput: images/s per host and per core, index build vs cached open,
and how many CPU cores a TPU v5e host needs to feed vit_b / vit_h training at 1024 px.

    python benchmarks/input_pipeline.py                         # 64 images, threads, tf (, grain)
    python benchmarks/input_pipeline.py --images 32 --batches 6 --workers 1,2 --backends threads

Data: SA-1B-like files made in a temporary folder (or --data-dir, reused when present): RGB JPEGs
(default 1500 x 2250, 1/f-noise texture under painted polygons) with ~100 COCO-RLE masks each
(pycocotools `mask.encode` of polygons, the painted ones and others), in sa_000000.tar ...
Pipeline: `make_train_iterator("sa1b:" + folder, ...)` per backend and worker count; grain (if
importable) maps the same per-example function (SA1BSource.load + make_training_example). The
first batch is a warm-up; "per core" is images per CPU-second of the whole process tree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from host_info import describe  # noqa: E402 (this folder, on sys.path when run as a script)

from sam_jax.data.sa1b import SA1BSource  # noqa: E402

TRAIN_KW = dict(image_size=1024, mask_size=256, max_masks=64)


# ---------------------------------------------------------------- data
def _polygon(rng, h: int, w: int) -> list[tuple[float, float]]:
    """A random star-shaped polygon of log-uniform area (0.03% .. 20% of the image)."""
    r = np.sqrt(10 ** rng.uniform(-3.5, -0.7) * h * w / np.pi)
    cx, cy, asp = rng.uniform(0, w), rng.uniform(0, h), rng.lognormal(0, 0.4)
    k = int(rng.integers(6, 40))
    ang, rad = np.sort(rng.uniform(0, 2 * np.pi, k)), r * rng.lognormal(0, 0.3, k)
    return list(
        zip(
            (cx + rad * np.cos(ang) * asp).tolist(),
            (cy + rad * np.sin(ang) / asp).tolist(),
            strict=True,
        )
    )


def make_image_files(n: int, h: int, w: int, num_masks: int, seed: int) -> tuple[bytes, bytes]:
    """(jpg bytes, SA-1B json bytes) of image n."""
    import cv2
    import pycocotools.mask as mask_utils
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, n])
    img = np.full((h, w, 3), 128, np.float32)
    for s, amp in ((375, 60), (94, 35), (24, 18), (6, 10)):
        small = rng.normal(0, amp, (h // s + 2, w // s + 2, 3)).astype(np.float32)
        img += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    polys = [_polygon(rng, h, w) for _ in range(num_masks)]
    draw = ImageDraw.Draw(pil)
    for p in polys[: num_masks // 2]:  # half of the masks are painted regions
        draw.polygon(p, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = cv2.GaussianBlur(np.asarray(pil), (3, 3), 0)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    anns = []
    for k, p in enumerate(polys):
        m = Image.new("L", (w, h))
        ImageDraw.Draw(m).polygon(p, fill=1)
        rle = mask_utils.encode(np.asfortranarray(np.asarray(m)))
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        seg = {"size": [h, w], "counts": rle["counts"].decode()}
        anns.append(
            {
                "id": n * 1000 + k,
                "segmentation": seg,
                "bbox": [x, y, bw, bh],
                "area": int(mask_utils.area(rle)),
                "predicted_iou": 0.9,
                "point_coords": [[x + bw / 2, y + bh / 2]],
                "stability_score": 0.95,
                "crop_box": [0, 0, w, h],
            }
        )
    meta = {"image": {"image_id": n, "width": w, "height": h, "file_name": f"sa_{n}.jpg"}}
    return buf.getvalue(), json.dumps({**meta, "annotations": anns}).encode()


def _make(a):
    return make_image_files(*a)


def make_dataset(folder: str, args) -> None:
    """Writes args.images SA-1B-like images into args.tars tars under folder (skip if present)."""
    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        return
    os.makedirs(folder, exist_ok=True)
    per_tar = -(-args.images // args.tars)
    jobs = [
        (n, args.height, args.width, args.masks_per_image, args.seed)
        for n in range(1, args.images + 1)
    ]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        tar = None
        for n, (jpg, meta) in enumerate(pool.map(_make, jobs), start=1):
            if (n - 1) % per_tar == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(os.path.join(folder, f"sa_{(n - 1) // per_tar:06d}.tar"), "w")
            for name, data in ((f"sa_{n}.jpg", jpg), (f"sa_{n}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        tar.close()
    open(done, "w").close()


# ---------------------------------------------------------------- index
def time_index(folder: str, index_dir: str, tmp: str, members: int) -> dict:
    """First open (scans the tars) vs cached open of the data; scan vs cached read of one tar of
    `members` jpg+json pairs with 1 KB members (an SA-1B tar's member count; 0: skip)."""
    from sam_jax.data import sa1b_index as si

    t = time.perf_counter()
    first = SA1BSource(folder, index_dir)
    t1 = time.perf_counter()
    second = SA1BSource(folder, index_dir)
    t2 = time.perf_counter()
    assert second.index_counts["built"] == 0 and len(first) == len(second)
    out = {"tars": len(first.index.tars), "images": len(first), "first_open_s": t1 - t}
    out["cached_open_s"] = t2 - t1
    if members:
        big, data = os.path.join(tmp, "big"), b"x" * 1000
        os.makedirs(big)
        with tarfile.open(os.path.join(big, "sa_000000.tar"), "w") as tar:
            for n in range(members):
                for ext in ("jpg", "json"):
                    info = tarfile.TarInfo(f"sa_{n}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        t = time.perf_counter()
        si.scan_tar(os.path.join(big, "sa_000000.tar"))
        t1 = time.perf_counter()
        SA1BSource(big, os.path.join(tmp, "big_index"))
        t2 = time.perf_counter()
        SA1BSource(big, os.path.join(tmp, "big_index"))
        out.update(
            one_tar_members=members,
            one_tar_scan_s=t1 - t,
            one_tar_cached_open_s=time.perf_counter() - t2,
        )
    return out


def time_index_at_scale(tmp: str, num_tars: int, per_tar: int) -> dict:
    """Cached open of a full-size index: num_tars sparse 10 GB tar files whose index files hold
    per_tar images each (the tars are never read: every index file is valid)."""
    import resource

    from sam_jax import paths
    from sam_jax.data import sa1b_index as si

    folder, index_dir = os.path.join(tmp, "scale"), os.path.join(tmp, "scale_index")
    os.makedirs(folder)
    os.makedirs(index_dir)
    base = np.arange(per_tar, dtype=np.int64) * 900_000
    for t in range(num_tars):
        tar = os.path.join(folder, f"sa_{t:06d}.tar")
        with open(tar, "wb") as f:
            f.truncate(10 * 2**30)
        stems = np.array([f"sa_{t * per_tar + k + 1}".encode() for k in range(per_tar)], "S")
        idx = si.TarIndex(stems, base + 512, base + 1000, base + 600_000, base + 200_000)
        data = si.encode_tar_index(idx, paths.file_signature(tar))
        paths.write_bytes(os.path.join(index_dir, si.cache_file_name(tar, folder)), data)
    import psutil

    rss0, maxrss0 = (
        psutil.Process().memory_info().rss,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    t = time.perf_counter()
    source = SA1BSource(folder, index_dir)
    dt = time.perf_counter() - t
    rss = psutil.Process().memory_info().rss
    assert source.index_counts == {"reused": num_tars, "built": 0}
    out = {
        "tars": num_tars,
        "images": len(source),
        "cached_open_s": dt,
        "index_mb": source.index.nbytes / 2**20,
        "index_files_mb": sum(
            os.path.getsize(os.path.join(index_dir, f)) for f in os.listdir(index_dir)
        )
        / 2**20,
        "rss_growth_mb": (rss - rss0) / 2**20,
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024,
    }
    del source
    paths.rmtree(folder)
    paths.rmtree(index_dir)
    return out


# ---------------------------------------------------------------- stages and pipelines
def profile_stages(folder: str, n: int, seed: int) -> dict:
    """Mean single-thread seconds per image of each step of the per-example work."""
    from sam_jax.data.pipeline import make_training_example
    from sam_jax.data.records import Record, decode_image, rle_masks_from_segmentations
    from sam_jax.data.sa1b import _read_members

    source, acc = SA1BSource(folder), {}
    x, n = source.index, min(n, len(source))

    def timed(key, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        acc[key] = acc.get(key, 0.0) + (time.perf_counter() - t) / n
        return out

    for i in range(n):
        spans = [
            (int(x.jpg_offset[i]), int(x.jpg_size[i])),
            (int(x.json_offset[i]), int(x.json_size[i])),
        ]
        jpg, js = timed("read", _read_members, x.tars[x.tar_id[i]], *spans)
        image = timed("jpeg_decode", decode_image, jpg)
        segs = [a["segmentation"] for a in timed("json_parse", json.loads, js)["annotations"]]
        masks = timed("rle_check", rle_masks_from_segmentations, segs, image.shape[:2], "", None)
        rng = np.random.default_rng([seed, i])
        timed(
            "resize_image_and_masks",
            lambda: make_training_example(Record("", image, masks), rng, **TRAIN_KW),
        )
    return acc


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (threads included)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


class ExampleFn:
    """Position q -> training example (None if unusable): the pipeline's per-example work."""

    def __init__(self, source: SA1BSource, seed: int):
        self.source, self.seed = source, seed
        self.order = np.random.default_rng(seed).permutation(len(source))

    def __call__(self, q: int):
        from sam_jax.data.pipeline import make_training_example

        record = self.source.load(int(self.order[q % len(self.order)]))
        if record is None:
            return None
        rng = np.random.default_rng([self.seed, q])
        return make_training_example(record, rng, **TRAIN_KW)


def grain_batches(folder: str, batch_size: int, workers: int, multiprocess: bool, seed: int):
    import grain

    ds = grain.MapDataset.range(0, 2**40).map(ExampleFn(SA1BSource(folder), seed))
    threads = 1 if multiprocess else workers
    ids = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    ids = ids.batch(batch_size, drop_remainder=True)
    if multiprocess:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(ids)


def time_batches(it, batches: int, batch_size: int) -> dict:
    t0 = time.perf_counter()
    next(it)  # warm-up: workers start, buffers fill
    warm = time.perf_counter() - t0
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert batch["image"].shape[1:] == (1024, 1024, 3) and batch["masks"].shape[1] == 64
    n = batches * batch_size
    return {
        "warmup_s": warm,
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_s": n / wall,
        "images_per_core_s": n / cpu,
        "cores_busy": cpu / wall,
    }


def run_pipeline(folder, backend, workers, args) -> dict:
    if backend.startswith("grain"):
        it = grain_batches(folder, args.batch_size, workers, backend == "grain-mp", args.seed)
    else:
        from sam_jax.data import make_train_iterator

        it = make_train_iterator(
            "sa1b:" + folder,
            batch_size=args.batch_size,
            backend=backend,
            num_workers=workers,
            **TRAIN_KW,
        )
    try:
        return {
            "backend": backend,
            "workers": workers,
            **time_batches(it, args.batches, args.batch_size),
        }
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        del it


# ---------------------------------------------------------------- what a TPU host needs
MODELS = {"vit_b": (12, 768), "vit_l": (24, 1024), "vit_h": (32, 1280)}


def encoder_forward_flops(depth: int, width: int, side: int = 64, window: int = 14) -> float:
    """Image encoder forward FLOPs at side x side tokens (1024 px): patch embedding, blocks (qkv
    and proj on the window-padded tokens, attention matmuls QK^T and AV, decomposed rel-pos
    einsums, MLP ratio 4), 4 global blocks, neck (1x1 and 3x3 convs to 256 channels)."""
    n, d = side * side, width
    ps = -(-side // window) * window
    npad, nwin, w2 = ps * ps, (ps // window) ** 2, window * window
    windowed = 8 * npad * d * d + 4 * nwin * w2 * w2 * d + 4 * npad * window * d + 16 * n * d * d
    glob = 8 * n * d * d + 4 * n * n * d + 4 * n * side * d + 16 * n * d * d
    patch, neck = 2 * n * 16 * 16 * 3 * d, 2 * n * d * 256 + 2 * n * 256 * 256 * 9
    return patch + (depth - 4) * windowed + 4 * glob + neck


def decoder_forward_flops(tokens: int = 7, c: int = 256, n: int = 4096) -> float:
    """Prompt encoder (mask-prompt convs) + mask decoder forward FLOPs for one prompt: two-way
    transformer (2 blocks, cross attention at c/2 channels over n image tokens, MLP 2048 on the
    `tokens` tokens), final token->image attention, 2 transposed convs to 256 x 256, mask product.
    Matmuls and convs only (XLA's count of this repo's decoder, elementwise ops included, is ~4.0
    GFLOP at 7 tokens)."""
    h = c // 2
    dense = 2 * n * 16 * 16 + 2 * n * 16 * c
    self_attn = 8 * tokens * c * c + 4 * tokens * tokens * c
    t2i = 2 * tokens * c * h + 4 * n * c * h + 4 * tokens * n * h + 2 * tokens * h * c
    i2t = 2 * n * c * h + 4 * tokens * c * h + 4 * n * tokens * h + 2 * n * h * c
    mlp = 4 * tokens * c * 2048
    upscale = 2 * n * c * (c // 4) * 4 + 2 * 4 * n * (c // 4) * (c // 8) * 4
    return dense + 2 * (self_attn + t2i + mlp + i2t) + t2i + upscale + 2 * 4 * (c // 8) * 16 * n


def tpu_needs(args, per_core: float) -> list[dict]:
    """Training images/s one host can consume (chips x peak x MFU / training FLOPs per image) and
    the input cores that takes at `per_core` images per CPU-second."""
    host_flops = args.chips_per_host * args.peak_tflops * 1e12 * args.mfu
    rows = []
    for name in args.models.split(","):
        enc = encoder_forward_flops(*MODELS[name])
        dec = decoder_forward_flops() * args.masks * args.rounds
        train = 3 * (enc + dec)
        need = host_flops / train
        rows.append(
            {
                "model": name,
                "encoder_fwd_tflop": enc / 1e12,
                "decoder_fwd_tflop": dec / 1e12,
                "train_tflop_per_image": train / 1e12,
                "images_per_s_per_host": need,
                "images_per_s_per_chip": need / args.chips_per_host,
                "cores_per_host": need / per_core if per_core else None,
            }
        )
    return rows


# ---------------------------------------------------------------- main
def _table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--tars", type=int, default=4)
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--width", type=int, default=2250)
    p.add_argument("--masks-per-image", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=8, help="timed batches (after 1 warm-up)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting (the best is kept)")
    p.add_argument("--backends", default="threads,tf,grain,grain-mp")
    p.add_argument("--data-dir", help="keep the generated data here (reused when complete)")
    p.add_argument("--scale-tars", type=int, default=1000, help="cached open at full size; 0: skip")
    p.add_argument("--scale-images-per-tar", type=int, default=11_186)
    p.add_argument(
        "--scan-members", type=int, default=11_186, help="pairs in the one-tar scan test"
    )
    p.add_argument("--chips-per-host", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=197.0, help="bf16 peak per chip (v5e)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--masks", type=int, default=64, help="masks per image in training")
    p.add_argument("--rounds", type=int, default=11, help="decoder rounds per mask")
    p.add_argument("--models", default="vit_b,vit_h")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "input_pipeline_cpu.json"),
    )
    args = p.parse_args(argv)
    result = run(args)
    report(result, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


def run(args) -> dict:
    backends = args.backends.split(",")
    if any(b.startswith("grain") for b in backends):
        try:
            import grain  # noqa: F401
        except ImportError:
            print("grain is not installed (pip install grain): skipping the grain backends")
            backends = [b for b in backends if not b.startswith("grain")]
    result = {"machine": describe(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="sa1b_bench_") as tmp:
        folder = args.data_dir or os.path.join(tmp, "sa1b")
        t = time.perf_counter()
        make_dataset(folder, args)
        tars = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar")]
        size = sum(os.path.getsize(f) for f in tars)
        gen = time.perf_counter() - t
        result["data"] = {"images": args.images, "tars": len(tars), "generate_s": gen}
        result["data"]["mb_per_image"] = size / 1e6 / args.images
        print(f"data: {args.images} images, {size / 1e6:.0f} MB in {len(tars)} tars", flush=True)
        result["index"] = time_index(folder, os.path.join(tmp, "index"), tmp, args.scan_members)
        if args.scale_tars:
            scale = time_index_at_scale(tmp, args.scale_tars, args.scale_images_per_tar)
            result["index_at_scale"] = scale
        SA1BSource(folder)  # the pipelines' default index dir, built before timing
        result["stages_s_per_image"] = profile_stages(folder, min(16, args.images), args.seed)
        rows = []
        for backend in backends:
            for w in (int(v) for v in args.workers.split(",")):
                runs = [run_pipeline(folder, backend, w, args) for _ in range(args.repeats)]
                rows.append(max(runs, key=lambda r: r["images_per_s"]))
                print(f"{backend} x{w}: {rows[-1]['images_per_s']:.3g} images/s", flush=True)
        result["pipeline"] = rows
    best = max(rows, key=lambda r: r["images_per_core_s"]) if rows else None
    result["best_per_core"] = best
    result["tpu_v5e_host"] = tpu_needs(args, best["images_per_core_s"] if best else 0.0)
    return result


def report(result: dict, args) -> None:
    m = result["machine"]
    print(f"\n{m['cpu_model']}, {m['cores']} cores, load average at start {m['load_avg_at_start']}")
    print("\nindex:\n" + _table([result["index"]], list(result["index"])))
    if "index_at_scale" in result:
        print(_table([result["index_at_scale"]], list(result["index_at_scale"])))
    stages = result["stages_s_per_image"]
    print("\nseconds per image, one thread:\n" + _table([stages], list(stages)))
    cols = ["backend", "workers", "images_per_s", "images_per_core_s", "cores_busy", "warmup_s"]
    head = f"\npipeline (batch {args.batch_size}, {args.batches} timed batches):\n"
    print(head + _table(result["pipeline"], cols))
    best = result["best_per_core"]
    per_core = f"{best['images_per_core_s']:.3g} ({best['backend']})" if best else "-"
    print(
        f"\nTPU v5e host: {args.chips_per_host} chips x {args.peak_tflops} TFLOP/s x MFU "
        f"{args.mfu}; training FLOPs = 3 x (encoder + decoder x {args.masks} masks x "
        f"{args.rounds} rounds); cores at the best images per core-second: {per_core}"
    )
    print(_table(result["tpu_v5e_host"], list(result["tpu_v5e_host"][0])))


if __name__ == "__main__":
    main()
