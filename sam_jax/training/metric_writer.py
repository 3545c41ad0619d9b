"""Metric logging: metrics.jsonl, TensorBoard event files, a tqdm bar, and MFU bookkeeping.

Only process 0 writes. metrics.jsonl holds one JSON object per logged step, e.g.
{"step": 100, "loss": ..., "focal": ..., "dice": ..., "iou_mse": ..., "lr": ...,
 "images_per_s": ..., "mfu": ..., "val/miou_1": ...}.

The workdir may be local or a URL (gs://bucket/...): both files are written through
`sam_jax.paths.Appender` (on an object store, which cannot append, each flush rewrites the whole
object; it is complete at every moment).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import jax

from sam_jax import paths

# Dense bfloat16 peak per chip (vendor spec sheets), by substring of jax Device.device_kind.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
)


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override if > 0, else the table above; on a CPU (no spec
    sheet) the measured float32 matmul throughput stands in; None if unknown."""
    if override_tflops and override_tflops > 0:
        return override_tflops * 1e12
    device = jax.devices()[0]
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return tflops * 1e12
    if device.platform == "cpu":
        return measured_matmul_flops()
    return None


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Dense float32 matmul FLOP/s of the default device (best of `repeats`)."""
    import time

    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_of(lowered: Any) -> float | None:
    """FLOPs of a lowered (not yet compiled) jax function, from XLA's HLO cost analysis.

    Lowered HLO is the global program before partitioning and before remat is scheduled, so this
    counts the model FLOPs of one step over the whole global batch.
    """
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not paths.exists(path):
        return []
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


class MetricWriter:
    """Writes metrics.jsonl and TensorBoard events under workdir (process 0 only)."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = paths.join(paths.resolve(workdir), "metrics.jsonl")
        self._tb = None
        self._jsonl = None
        if not self.active:
            return
        paths.makedirs(workdir)
        # On resume, drop records of steps after the restored checkpoint: they are redone.
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        self._jsonl = paths.Appender(self.path, initial=text.encode("utf-8"))
        if tensorboard:
            self._tb = EventFileWriter(paths.join(paths.resolve(workdir), "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: _to_py(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            scalars = {
                k: float(v)
                for k, v in clean.items()
                if isinstance(v, int | float) and math.isfinite(v)
            }
            self._tb.write_scalars(int(step), scalars)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class EventFileWriter:
    """Minimal TensorBoard event file writer (scalars only), local or remote.

    Writes an `events.out.tfevents.*` file: TFRecord records (length, masked CRC-32C of the
    length, data, masked CRC-32C of the data) of `tensorflow.Event` protos (wall_time = 1,
    step = 2, file_version = 3, summary = 5; Summary.Value: tag = 1, simple_value = 2), encoded
    here, so neither tensorflow nor tensorboard is needed to write them. Each record is flushed.
    """

    def __init__(self, logdir: str):
        import socket
        import time
        import uuid

        paths.makedirs(logdir)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        name += f".{uuid.uuid4().hex[:8]}"  # two writers in one second get two files
        self.path = paths.join(logdir, name)
        self._file = paths.Appender(self.path, initial=b"")
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        import time

        self._write(encode_event(time.time(), step=step, scalars=scalars))

    def close(self) -> None:
        self._file.close()


# Protobuf and TFRecord encoding of TensorBoard scalar events.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative values
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_event(
    wall_time: float,
    step: int = 0,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """A serialized tensorflow `Event` proto with a wall time, a step and scalar summaries."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:
        out += _varint(2 << 3) + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode("utf-8"))
    if scalars:
        values = b"".join(
            _field_bytes(
                1,
                _field_bytes(1, str(tag).encode("utf-8"))
                + _varint(2 << 3 | 5)
                + struct.pack("<f", float(value)),
            )
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, values)
    return out


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    try:
        import google_crc32c  # a C implementation, when installed (gcsfs brings it)

        return int(google_crc32c.value(bytes(data)))
    except ImportError:
        pass
    if not _CRC32C_TABLE:
        _CRC32C_TABLE.extend(_crc32c_table())
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord record holding `data`."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def _to_py(v: Any) -> Any:
    try:
        v = v.item()
    except AttributeError:
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
