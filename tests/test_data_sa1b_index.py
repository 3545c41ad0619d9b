"""SA-1B tar index cache: built once, reused, rebuilt when stale or corrupt, shared by processes."""

import collections
import io
import json
import os
import tarfile
import threading

import numpy as np
import pytest

from sam_jax.data import sa1b_index
from sam_jax.data.sa1b import SA1BSource, sa1b_record
from tests.fixtures_data import (
    encode_image,
    encode_rle,
    sa1b_json,
    synthetic_examples,
    write_sa1b_dataset,
)


@pytest.fixture
def scans(monkeypatch):
    """Counts scan_tar calls per tar path (the only function that reads tar headers)."""
    calls = collections.Counter()
    real = sa1b_index.scan_tar
    lock = threading.Lock()

    def counting(path):
        with lock:
            calls[os.path.basename(path)] += 1
        return real(path)

    monkeypatch.setattr(sa1b_index, "scan_tar", counting)
    return calls


def _dataset(tmp_path, n=7, per_tar=2, **kwargs):
    kwargs.setdefault("broken", False)
    return write_sa1b_dataset(
        tmp_path / "sa1b", synthetic_examples(n), images_per_tar=per_tar, **kwargs
    )


def _ids(source):
    return [source.image_id(i) for i in range(len(source))]


def _same_index(a, b):
    fields = ("tar_id", "stems", "jpg_offset", "jpg_size", "json_offset", "json_size")
    return a.index.tars == b.index.tars and all(
        np.array_equal(getattr(a.index, k), getattr(b.index, k)) for k in fields
    )


def test_second_open_reads_no_tar_headers(tmp_path, scans):
    fx = _dataset(tmp_path)
    first = SA1BSource(fx.path)
    tars = sorted(p for p in os.listdir(fx.path) if p.endswith(".tar"))
    assert len(tars) == 4 and scans == {t: 1 for t in tars}
    assert first.index_counts == {"reused": 0, "built": 4}
    index_dir = os.path.join(fx.path, sa1b_index.INDEX_DIRNAME)
    assert first.index_dir == index_dir
    assert sorted(os.listdir(index_dir)) == [t + sa1b_index.CACHE_SUFFIX for t in tars]
    scans.clear()
    with pytest.MonkeyPatch.context() as mp:  # and nothing else opens a tar either
        mp.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a tar was opened"))
        second = SA1BSource(fx.path)
    assert not scans and second.index_counts == {"reused": 4, "built": 0}
    assert _same_index(first, second) and _ids(first) == [f"sa_{k}" for k in range(1, 8)]
    idx = second.index
    assert idx.tar_id.dtype == np.int32 and idx.stems.dtype.kind == "S"
    assert all(getattr(idx, k).dtype == np.int64 for k in ("jpg_offset", "json_size"))
    assert idx.nbytes < 60 * len(idx)


def test_cache_file_names_follow_the_tar_paths(tmp_path):
    root = str(tmp_path)
    name = sa1b_index.cache_file_name
    assert name(f"{root}/sa_000001.tar", root) == "sa_000001.tar.index.npz"
    assert name(f"{root}/a/b/sa_000001.tar", root) == "a__b__sa_000001.tar.index.npz"
    assert name("gs://bkt/sa1b/x/sa_2.tar", "gs://bkt/sa1b") == "x__sa_2.tar.index.npz"


def _rewrite_tar(path, stems_and_examples):
    with tarfile.open(path, "w") as tar:
        for n, (stem, ex) in enumerate(stems_and_examples):
            hw = ex["image"].shape[:2]
            meta = sa1b_json(n, stem + ".jpg", hw, [encode_rle(m) for m in ex["masks"]])
            for name, data in (
                (stem + ".jpg", encode_image(ex["image"], "PNG")),
                (stem + ".json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_changed_tar_is_reindexed(tmp_path, scans):
    fx = _dataset(tmp_path, image_format="PNG")
    SA1BSource(fx.path)
    scans.clear()
    tar = os.path.join(fx.path, "sa_000001.tar")
    new = synthetic_examples(3, seed=99)
    _rewrite_tar(tar, [("sa_3", new[0]), ("sa_3b", new[1]), ("sa_4", new[2])])
    source = SA1BSource(fx.path)
    assert scans == {"sa_000001.tar": 1} and source.index_counts == {"reused": 3, "built": 1}
    assert _ids(source) == ["sa_1", "sa_2", "sa_3", "sa_3b", "sa_4", "sa_5", "sa_6", "sa_7"]
    record = source.load(3)
    assert np.array_equal(record.image, new[1]["image"])
    assert np.array_equal(record.masks.decode(), new[1]["masks"])
    scans.clear()
    st = os.stat(tar)  # same size, new modification time: indexed again
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _ids(SA1BSource(fx.path)) == _ids(source) and scans == {"sa_000001.tar": 1}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad_arrays", "old_version"])
def test_a_corrupt_cache_file_is_rebuilt(tmp_path, scans, damage):
    fx = _dataset(tmp_path)
    fresh = SA1BSource(fx.path)
    file = os.path.join(fresh.index_dir, "sa_000002.tar" + sa1b_index.CACHE_SUFFIX)
    data = open(file, "rb").read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"PK\x03\x04" + os.urandom(300)
    elif damage == "empty":
        data = b""
    else:
        buf = io.BytesIO()
        arrays = dict(np.load(io.BytesIO(data)))
        meta = json.loads(str(arrays["meta"]))
        if damage == "bad_arrays":
            arrays["pairs"]["jpg_offset"][0] = -1
        else:
            meta["version"] += 1
        arrays["meta"] = np.str_(json.dumps(meta))
        np.savez(buf, **arrays)
        data = buf.getvalue()
    open(file, "wb").write(data)
    scans.clear()
    rebuilt = SA1BSource(fx.path)
    assert scans == {"sa_000002.tar": 1} and _same_index(fresh, rebuilt)
    scans.clear()
    assert _same_index(fresh, SA1BSource(fx.path)) and not scans  # rewritten, valid again


def _open_in_threads(path, index_dirs, process_count):
    barrier = threading.Barrier(process_count)
    calls = collections.Counter()
    out = [None] * process_count

    def run(p):
        def sync():
            calls[p] += 1
            barrier.wait(timeout=60)

        out[p] = SA1BSource(
            path, index_dirs[p], process_index=p, process_count=process_count, barrier=sync
        )

    threads = [threading.Thread(target=run, args=(p,)) for p in range(process_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert calls == {p: 1 for p in range(process_count)}
    return out


def test_two_processes_share_the_building(tmp_path, scans):
    fx = _dataset(tmp_path, n=9)  # 5 tars
    shared = str(tmp_path / "index")
    p0, p1 = _open_in_threads(fx.path, [shared, shared], 2)
    assert sum(scans.values()) == 5 and set(scans.values()) == {1}  # each tar scanned once
    assert p0.index_counts["built"] == 3 and p1.index_counts["built"] == 2
    single = SA1BSource(fx.path, str(tmp_path / "single"))
    assert _same_index(p0, single) and _same_index(p1, single) and len(single) == 9
    assert _ids(p0) == _ids(p1) == _ids(single)
    for i in (0, 4, 8):
        a, b = p1.load(i), single.load(i)
        assert np.array_equal(a.image, b.image) and np.array_equal(
            a.masks.decode(), b.masks.decode()
        )


def test_unshared_index_dirs_and_more_processes_than_tars(tmp_path, scans, caplog):
    fx = _dataset(tmp_path, n=5, per_tar=3)  # 2 tars
    own = [str(tmp_path / f"host{p}") for p in range(3)]
    sources = _open_in_threads(fx.path, own, 3)
    # each host finds only its own files after the barrier: it builds the rest itself
    assert [s.index_counts["built"] for s in sources] == [2, 2, 2] and scans == {
        "sa_000000.tar": 3,
        "sa_000001.tar": 3,
    }
    assert all(_same_index(s, sources[0]) for s in sources) and len(sources[0]) == 5
    assert "pass a shared index_dir" in caplog.text


def test_load_returns_the_records_in_the_tars(tmp_path):
    fx = write_sa1b_dataset(tmp_path / "sa1b", layout="both", image_format="PNG", broken=True)
    source = SA1BSource(fx.path)
    tars = sorted(p for p in os.listdir(fx.path) if p.endswith(".tar"))
    direct = {}
    for name in tars:  # the reading before the index cache: tarfile's own member data
        with tarfile.open(os.path.join(fx.path, name)) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for k in sorted(files):
            if k.endswith(".jpg"):
                direct[k[:-4]] = sa1b_record(files[k], files[k[:-4] + ".json"], k[:-4], {})
    stats = {}
    assert _ids(source) == [f"sa_{k}" for k in range(1, 7)]
    for i, image_id in enumerate(_ids(source)):
        record = source.load(i, stats)
        if image_id in fx.broken_images:
            assert record is None
            continue
        assert record.image_id == image_id
        assert np.array_equal(record.image, fx.images[image_id])
        assert np.array_equal(record.masks.decode(), fx.masks[image_id])
        if image_id in direct:
            assert np.array_equal(record.image, direct[image_id].image)
            assert np.array_equal(record.masks.decode(), direct[image_id].masks.decode())
    assert stats["skipped_images"] == 1 and stats["skipped_masks"] == 1
    with pytest.raises(IndexError):
        source.load(len(source))


def test_default_index_dir_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    fx = _dataset(tmp_path, n=2)
    monkeypatch.setenv("SAM_JAX_CACHE", str(tmp_path / "cache"))
    assert sa1b_index.default_index_dir(fx.path) == os.path.join(fx.path, ".sam_jax_index")
    monkeypatch.setattr(sa1b_index.os, "access", lambda *a: False)  # a read-only data folder
    cache = sa1b_index.default_index_dir(fx.path)
    assert cache.startswith(str(tmp_path / "cache" / "sa1b_index") + os.sep)
    assert cache != sa1b_index.default_index_dir(fx.path + "/sa_000000.tar")
    source = SA1BSource(fx.path)
    assert source.index_dir == cache and os.listdir(cache) == ["sa_000000.tar.index.npz"]
    assert not os.path.exists(os.path.join(fx.path, ".sam_jax_index"))


def test_an_unwritable_index_dir_still_opens(tmp_path, scans, caplog):
    fx = _dataset(tmp_path, n=3)
    (tmp_path / "file").write_text("not a folder")
    source = SA1BSource(fx.path, str(tmp_path / "file" / "index"))
    assert len(source) == 3 and "cannot write index files" in caplog.text
    with pytest.raises(TypeError, match="keyword"):
        SA1BSource(fx.path, 0, 1)


def test_tars_and_index_on_a_bucket(tmp_path, gcs, scans, monkeypatch):
    fx = _dataset(tmp_path, n=5, per_tar=2, image_format="PNG")
    remote = gcs.url(f"sa1b-{os.getpid()}-{id(fx)}")
    for name in sorted(os.listdir(fx.path)):
        if name.endswith(".tar"):
            sa1b_index.paths.write_bytes(f"{remote}/{name}", open(f"{fx.path}/{name}", "rb").read())
    monkeypatch.setenv("SAM_JAX_CACHE", str(tmp_path / "cache"))
    assert sa1b_index.default_index_dir(remote).startswith(str(tmp_path / "cache"))
    index_dir = remote + "/" + sa1b_index.INDEX_DIRNAME  # inside the data folder: not walked
    first = SA1BSource(remote, index_dir)
    assert first.index_counts == {"reused": 0, "built": 3} and len(first) == 5
    second = SA1BSource(remote, index_dir)
    assert second.index_counts == {"reused": 3, "built": 0} and sum(scans.values()) == 3
    assert _ids(second) == list(fx.images)
    for i, image_id in enumerate(_ids(second)):
        record = second.load(i)
        assert np.array_equal(record.image, fx.images[image_id])
        assert np.array_equal(record.masks.decode(), fx.masks[image_id])
