"""Where a compiled program's FLOPs and memory traffic go, read from its optimised HLO text.

XLA's `compiled.cost_analysis()` gives totals and counts the body of a while loop once, not once
per trip: a train step whose decoder rounds run in a `lax.scan` (a while loop) is under-counted by
(rounds - 1) round bodies. `analyze(compiled.as_text())` counts every top-level operation of the
program (a fusion, a custom call such as a Pallas kernel, a copy, a collective, an unfused op)
as often as it runs, the way XLA's cost analysis counts one run:

- bytes: what the operation reads and writes in memory, as laid out in tiles (T(8,128) pads the
  two minor dims): its operands and its result, except that an operand read only through a
  (dynamic) slice or gather counts the slice, and an in-place dynamic-update-slice counts the
  update; what stays inside a fusion never reaches memory. Operands or results in memory space
  S(1) and up (on-chip VMEM, SMEM) are included and also summed apart (`vmem_bytes`); what
  remains is HBM traffic (`hbm_bytes`): a prefetch or eviction (copy-start) counts its HBM side;
- flops: 2 x output elements x contracted elements of every dot and convolution, inside fusions
  too (taps that land on padding are not counted); elementwise arithmetic is left out;
- trips: a while body counts its trip count times (read from its condition, the loop counter
  compared with a constant, as lax.scan / lax.map / fori_loop build it); nested loops multiply;
  a loop whose count cannot be read counts once and is listed in `unknown_loops`.

A Pallas TPU kernel (custom call `tpu_custom_call`) counts its operands and results, and the
FLOPs of the cost estimate it was given, when the HLO carries one.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# Operations that move no data of their own (views, tuples, loop plumbing, async completions).
FREE_OPS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "opt-barrier",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
    "add-dependency",
}
SLICING_OPS = {"slice", "dynamic-slice", "gather"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([^\s(={]+)\s*[({]")


@dataclasses.dataclass
class Instr:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the text between the parentheses (a parameter's index, a constant)
    root: bool = False


@dataclasses.dataclass
class OpCost:
    """One top-level operation: bytes and FLOPs of one run, and how many runs."""

    name: str
    opcode: str
    op_name: str  # the jax operation it came from (HLO metadata), shortened
    bytes: float
    vmem_bytes: float
    flops: float
    trips: int


@dataclasses.dataclass
class Traffic:
    """Per-device totals over a program, every loop trip counted."""

    flops: float
    bytes: float
    vmem_bytes: float
    collective_bytes: float
    ops: list[OpCost]
    unknown_loops: list[str]

    @property
    def hbm_bytes(self) -> float:
        """Bytes moved to or from HBM: accesses to on-chip memory (S(1) and up) left out."""
        return self.bytes - self.vmem_bytes

    def top(self, n: int = 20, by: str = "bytes", depth: int | None = None) -> list[dict]:
        """The n largest contributors ({"op", "bytes", "hbm_bytes", "flops", "count"}, every run
        counted),
        grouped by jax op name (cut to its first `depth` path parts when given)."""
        groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for op in self.ops:
            key = op.op_name or op.opcode
            if depth is not None:
                key = "/".join(key.split("/")[:depth])
            g = groups[key]
            g["bytes"] += op.bytes * op.trips
            g["hbm_bytes"] += (op.bytes - op.vmem_bytes) * op.trips
            g["flops"] += op.flops * op.trips
            g["count"] += op.trips
        rows = sorted(groups.items(), key=lambda kv: -kv[1][by])[:n]
        keys = ("bytes", "hbm_bytes", "flops", "count")
        return [{"op": k, **{f: v[f] for f in keys}} for k, v in rows]

    def summary(self) -> dict[str, Any]:
        return {
            "flops": self.flops,
            "bytes": self.bytes,
            "vmem_bytes": self.vmem_bytes,
            "hbm_bytes": self.hbm_bytes,
            "collective_bytes": self.collective_bytes,
            "unknown_loops": len(self.unknown_loops),
        }


# ----------------------------------------------------------------------------- parsing


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at text[start]."""
    closing = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in closing:
            stack.append(closing[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m.group(3)
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    close = _balanced(rest, paren)
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[paren + 1 : close - 1]) if o]
    args = rest[paren + 1 : close - 1]
    return Instr(
        m.group(2), type_text, rest[:paren], operands, rest[close:], args, bool(m.group(1))
    )


def _split_top(text: str) -> list[str]:
    """Comma-separated items of `text` that are not inside brackets."""
    items, depth, cur = [], 0, ""
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += c
    return items + ([cur.strip()] if cur.strip() else [])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """HLO module text -> ({computation name: instructions}, entry computation name).

    An instruction may span lines (a backend config printed as indented JSON)."""
    comps: dict[str, list[Instr]] = {}
    entry, current, pending = "", None, None

    def flush():
        if current is not None and pending is not None:
            instr = _parse_instr(pending)
            if instr is not None:
                comps[current].append(instr)

    for line in text.splitlines():
        m = _COMP.match(line)
        if m and line.rstrip().endswith("{") and " = " not in line:
            current, pending = m.group(2), None
            comps[current] = []
            entry = current if m.group(1) else entry
        elif line.strip() == "}" and not line.startswith(" "):
            flush()
            current, pending = None, None
        elif current is not None:
            if _INSTR.match(line):
                flush()
                pending = line
            elif pending is not None:
                pending += " " + line.strip()
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(r"\b" + re.escape(key) + r"=(\{[^}]*\}|[^,\s]+)", attrs)
    return m.group(1) if m else None


def _callees(ins: Instr) -> list[str]:
    names = []
    for key in (
        "calls",
        "to_apply",
        "branch_computations",
        "true_computation",
        "false_computation",
    ):
        value = _attr(ins.attrs, key)
        if value:
            names += [v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip()]
    return names


# ----------------------------------------------------------------------------- sizes


def _padded(dims: list[int], layout: str) -> list[int]:
    """dims padded to the layout's first tile: T(8,128) rounds the most minor dim up to a
    multiple of 128 and the next one to a multiple of 8 (what the array occupies)."""
    m = re.match(r"\{([0-9,]*)(?::T\(([0-9,]+)\))?", layout)
    if not m or not m.group(2) or not dims:
        return dims
    minor_to_major = [int(i) for i in m.group(1).split(",") if i]
    out = list(dims)
    for size, dim in zip(
        reversed([int(t) for t in m.group(2).split(",")]), minor_to_major, strict=False
    ):
        out[dim] = -(-out[dim] // size) * size
    return out


def shape_bytes(type_text: str, padded: bool = True) -> tuple[float, float]:
    """(bytes, bytes in memory space S(1)) of an HLO type, an array or a tuple; padded: as laid
    out in tiles, else the logical size."""
    total = vmem = 0.0
    for dtype, dims, layout in _SHAPE.findall(type_text):
        if dtype not in DTYPE_BYTES:
            continue
        shape = [int(d) for d in dims.split(",") if d]
        if padded and layout:
            shape = _padded(shape, layout)
        n = 1
        for d in shape:
            n *= d
        b = n * DTYPE_BYTES[dtype]
        total += b
        vmem += b if layout and re.search(r"S\([1-9]", layout) else 0.0
    return total, vmem


def _dims(type_text: str) -> list[int]:
    m = _SHAPE.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _tuple_elements(type_text: str) -> list[str]:
    """Top-level elements of a tuple type text ("(a, (b, c), d)" -> ["a", "(b, c)", "d"])."""
    inner, parts, depth, cur = type_text.strip()[1:-1], [], 0, ""
    for c in inner:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        parts.append(re.sub(r"/\*[^*]*\*/", "", cur).strip())
    return [re.sub(r"/\*[^*]*\*/", "", p).strip() for p in parts]


# ----------------------------------------------------------------------------- FLOPs


def _dot_flops(ins: Instr, types: dict[str, str]) -> float:
    out = 1
    for d in _dims(ins.type_text):
        out *= d
    if ins.opcode == "dot":
        lhs = _dims(types.get(ins.operands[0], ""))
        k = 1
        for i in re.findall(r"\d+", _attr(ins.attrs, "lhs_contracting_dims") or ""):
            k *= lhs[int(i)] if int(i) < len(lhs) else 1
        return 2.0 * out * k
    return _conv_flops(ins, types, out)


def _window(attrs: str, n: int) -> dict[str, list]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}

    def ints(key: str) -> list[int]:
        v = fields.get(key)
        return [int(x) for x in v.split("x")] if v else [1] * n

    pad = fields.get("pad")
    pads = [int(x.split("_")[0]) for x in pad.split("x")] if pad else [0] * n
    return {
        "stride": ints("stride"),
        "pad_low": pads,
        "lhs": ints("lhs_dilate"),
        "rhs": ints("rhs_dilate"),
    }


def _conv_flops(ins: Instr, types: dict[str, str], out_elements: int) -> float:
    """2 x output elements x input features x the kernel taps per output that land on the
    input (not on padding or between dilated inputs), as XLA's cost analysis counts."""
    m = re.match(r"([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", _attr(ins.attrs, "dim_labels") or "")
    if not m or len(ins.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    lhs, rhs = _dims(types.get(ins.operands[0], "")), _dims(types.get(ins.operands[1], ""))
    out = _dims(ins.type_text)
    if (len(lhs), len(rhs), len(out)) != (len(lhs_l), len(rhs_l), len(out_l)):
        return 0.0
    spatial = sorted(c for c in rhs_l if c.isdigit())
    w = _window(ins.attrs, len(spatial))
    taps = 1.0  # mean taps per output position that read real input
    for d, c in enumerate(spatial):
        size_in, size_k, size_out = lhs[lhs_l.index(c)], rhs[rhs_l.index(c)], out[out_l.index(c)]
        extent = (size_in - 1) * w["lhs"][d] + 1
        valid = 0
        for o in range(size_out):
            for k in range(size_k):
                p = o * w["stride"][d] - w["pad_low"][d] + k * w["rhs"][d]
                valid += 0 <= p < extent and p % w["lhs"][d] == 0
        taps *= valid / max(size_out, 1)
    return 2.0 * out_elements * rhs[rhs_l.index("i")] * taps


def _custom_call_flops(attrs: str) -> float:
    """FLOPs a Pallas kernel declares through its cost estimate (0 when it declares none)."""
    m = re.search(r'\\?"flops\\?"\s*:\s*\\?"?(\d+)', attrs)
    return float(m.group(1)) if m else 0.0


# ----------------------------------------------------------------------------- bytes


class _Module:
    def __init__(self, text: str):
        self.comps, self.entry = parse_module(text)
        self.types = {i.name: i.type_text for c in self.comps.values() for i in c}
        self.consts = {
            i.name: int(i.args)
            for c in self.comps.values()
            for i in c
            if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args.strip())
        }
        self._flops: dict[str, float] = {}

    def fused_flops(self, comp: str) -> float:
        if comp not in self._flops:
            total = 0.0
            for ins in self.comps.get(comp, []):
                if ins.opcode in ("dot", "convolution"):
                    total += _dot_flops(ins, self.types)
                total += sum(self.fused_flops(c) for c in _callees(ins))
            self._flops[comp] = total
        return self._flops[comp]

    def trip_count(self, loop: Instr) -> int | None:
        """The trip count XLA annotates (CPU), else `i < N` read from the condition (TPU), a
        compare with a constant, possibly wrapped in a fusion."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
        if m:
            return int(m.group(1))
        cond = self.comps.get((_attr(loop.attrs, "condition") or "").lstrip("%"), [])
        for ins in cond:
            if ins.opcode == "compare" and "direction=LT" in ins.attrs:
                return next((self.consts[o] for o in ins.operands if o in self.consts), None)
            if ins.opcode == "fusion" and ins.root:
                body = self.comps.get((_callees(ins) or [""])[0], [])
                params = {i.name: int(i.args) for i in body if i.opcode == "parameter"}
                for inner in body:
                    if inner.opcode == "compare" and "direction=LT" in inner.attrs:
                        for o in inner.operands[1:]:
                            if o in params and ins.operands[params[o]] in self.consts:
                                return self.consts[ins.operands[params[o]]]
        return None

    def fusion_bytes(self, ins: Instr, comp: str) -> tuple[float, float]:
        """(bytes, vmem bytes) of one fusion run: what it reads of each operand (a slice when
        the operand is only sliced inside) and what it writes (an in-place update's slice)."""
        body = self.comps.get(comp, [])
        users: dict[str, list[Instr]] = defaultdict(list)
        for i in body:
            for o in i.operands:
                users[o].append(i)
        params = {}
        for i in body:
            if i.opcode == "parameter":
                params[int(i.args)] = i
        root = next((i for i in body if i.root), body[-1] if body else None)
        in_place = set()
        roots = [root] if root is not None else []
        if root is not None and root.opcode == "tuple":
            by_name = {i.name: i for i in body}
            roots = [by_name[o] for o in root.operands if o in by_name]
        total = vmem = 0.0
        for r in roots:
            if r.opcode == "dynamic-update-slice":
                in_place.add(self._source_param(r.operands[0], body))
                b, v = shape_bytes(self.types.get(r.operands[1], ""))
            else:
                b, v = shape_bytes(r.type_text)
            total, vmem = total + b, vmem + v
        for idx, p in params.items():
            if idx >= len(ins.operands) or p.name in in_place:
                continue
            readers = self._readers(p.name, users)
            if readers and all(u.opcode in SLICING_OPS for u in readers):
                b = sum(shape_bytes(u.type_text)[0] for u in readers)
                v = b if re.search(r"S\([1-9]", self.types.get(ins.operands[idx], "")) else 0.0
            else:
                b, v = shape_bytes(self.types.get(ins.operands[idx], ""))
            total, vmem = total + b, vmem + v
        return total, vmem

    def _readers(self, name: str, users: dict[str, list[Instr]]) -> list[Instr]:
        """The instructions that consume `name`, looking through bitcasts."""
        out = []
        for u in users.get(name, []):
            out += self._readers(u.name, users) if u.opcode == "bitcast" else [u]
        return out

    @staticmethod
    def _source_param(name: str, body: list[Instr]) -> str:
        by_name = {i.name: i for i in body}
        while name in by_name and by_name[name].opcode == "bitcast":
            name = by_name[name].operands[0]
        return name

    def op_bytes(self, ins: Instr) -> tuple[float, float]:
        op = ins.opcode
        if op == "fusion":
            calls = _callees(ins)
            return self.fusion_bytes(ins, calls[0]) if calls else shape_bytes(ins.type_text)
        if op in ("dynamic-slice", "slice", "gather"):
            b, v = shape_bytes(ins.type_text)
            return 2 * b, 2 * v
        if op == "dynamic-update-slice":
            b, v = shape_bytes(self.types.get(ins.operands[1], ""))
            return 2 * b, 2 * v
        if op.endswith("-done"):
            return 0.0, 0.0
        if op.endswith("-start") and ins.type_text.startswith("("):
            # (operands, result, context...): the source is read, the result written.
            parts = _tuple_elements(ins.type_text)
            b, v = shape_bytes(parts[1] if len(parts) > 1 else ins.type_text)
            if op in ("copy-start", "slice-start"):
                src_b, src_v = (b, v) if op == "slice-start" else (0.0, 0.0)
                if op == "copy-start":
                    src_b, src_v = shape_bytes(self.types.get(ins.operands[0], ""))
                return src_b + b, src_v + v
            for o in ins.operands:
                ob, ov = shape_bytes(self.types.get(o, ""))
                b, v = b + ob, v + ov
            return b, v
        total, vmem = shape_bytes(ins.type_text)
        for o in ins.operands:
            b, v = shape_bytes(self.types.get(o, ""))
            total, vmem = total + b, vmem + v
        return total, vmem


def _op_name(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return ""
    name = re.sub(r"jit\(([^)]*)\)", r"\1", m.group(1).split(";")[0])
    name = re.sub(r"\b(jvp|transpose|vmap|checkpoint|remat)\(([^()]*)\)", r"\2", name)
    name = re.sub(r"\b(jvp|transpose|vmap)\(([^()]*)\)", r"\2", name)
    return name


def analyze(text: str) -> Traffic:
    """Per-device traffic of an optimised HLO module (`compiled.as_text()`), loops counted."""
    mod = _Module(text)
    ops: list[OpCost] = []
    unknown: list[str] = []

    def walk(comp: str, trips: int) -> None:
        for ins in mod.comps.get(comp, []):
            if ins.opcode == "while":
                n = mod.trip_count(ins)
                if n is None:
                    unknown.append(ins.name)
                walk((_attr(ins.attrs, "body") or "").lstrip("%"), trips * (n or 1))
            elif ins.opcode in ("call", "conditional"):
                for callee in _callees(ins):
                    walk(callee, trips)
            elif ins.opcode not in FREE_OPS:
                b, v = mod.op_bytes(ins)
                if ins.opcode == "fusion":
                    flops = sum(mod.fused_flops(c) for c in _callees(ins))
                elif ins.opcode in ("dot", "convolution"):
                    flops = _dot_flops(ins, mod.types)
                elif ins.opcode == "custom-call":
                    flops = _custom_call_flops(ins.attrs)
                else:
                    flops = 0.0
                ops.append(OpCost(ins.name, ins.opcode, _op_name(ins.attrs), b, v, flops, trips))

    walk(mod.entry, 1)
    return Traffic(
        flops=sum(o.flops * o.trips for o in ops),
        bytes=sum(o.bytes * o.trips for o in ops),
        vmem_bytes=sum(o.vmem_bytes * o.trips for o in ops),
        collective_bytes=sum(o.bytes * o.trips for o in ops if o.opcode.startswith(COLLECTIVES)),
        ops=ops,
        unknown_loops=unknown,
    )
