"""Reading the weighted operations of an ONNX graph by structure (for `onnx_weights`).

An ONNX file names its initializers as its exporter chose (`onnx::MatMul_2385`, our params paths,
anything after a rename), so nothing here reads a name. Instead the graph is indexed (producer
and consumers of every tensor, constants from initializers and Constant nodes) and its weighted
operations are recognised by their node patterns:

- `Op("linear")`: MatMul(x, W const 2-D) with an optional Add(const 1-D) after it, or Gemm;
  `weight` is stored (in, out) as in Flax;
- `Op("conv")` / `Op("conv_transpose")`: Conv / ConvTranspose with a constant weight, an
  optional constant bias, and for Conv an optional BatchNormalization after it (`bn`);
- `Op("norm")`: LayerNormalization, or the decomposed form torch exports below opset 17
  (ReduceMean, Sub, Pow|Mul, ReduceMean, Add eps, Sqrt, Div, Mul scale, Add bias); `scale` and
  `bias` are flattened to (C,), `channels_first` tells a LayerNorm2d ((C, 1, 1) scale).

Ops carry `pos`, the index of their first node in the graph's (topologically sorted) node list,
which orders the ops of a chain; where branches run in parallel callers disambiguate by
structure (`trace_back`, `trace_forward`). `onnx` is imported lazily.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Ops that only move or relabel data: traced through when following a tensor to its source.
LAYOUT_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Cast")


class GraphMismatch(Exception):
    """What in a graph did not match the expected structure (one line, without the file)."""


@dataclasses.dataclass
class Op:
    """One weighted operation: kind, its arrays, input tensor `x`, output tensor `out` (after
    the bias / BatchNorm), node attributes, position `pos` in the node list."""

    kind: str
    arrays: dict[str, np.ndarray]
    x: str
    out: str
    attrs: dict[str, Any]
    pos: int
    nodes: tuple[Any, ...] = ()

    def shape(self, name: str = "weight") -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)


class Graph:
    """An indexed ONNX graph: `consts`, `producer`, `consumers`, node positions."""

    def __init__(self, model: Any):
        from onnx import AttributeProto, numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.inputs = {i.name: _dims(i) for i in graph.input}
        self.outputs = {o.name: _dims(o) for o in graph.output}
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer
        }
        for name in list(self.inputs):  # an initializer may be listed as an input too
            if name in self.consts:
                del self.inputs[name]
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.pos: dict[int, int] = {}
        for i, node in enumerate(self.nodes):
            self.pos[id(node)] = i
            if node.op_type == "Constant" and node.attribute:
                a = node.attribute[0]
                if a.type == AttributeProto.TENSOR:
                    self.consts[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.type == AttributeProto.FLOAT:
                    self.consts[node.output[0]] = np.asarray(a.f, np.float32)
                elif a.type == AttributeProto.INT:
                    self.consts[node.output[0]] = np.asarray(a.i, np.int64)
                elif a.type == AttributeProto.INTS:
                    self.consts[node.output[0]] = np.asarray(list(a.ints), np.int64)
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    # ------------------------------------------------------------------ basics

    def const(self, name: str) -> np.ndarray | None:
        """The constant value of a tensor (through Identity), None if computed."""
        while name not in self.consts:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return self.consts[name]

    def attrs(self, node: Any) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def node_pos(self, node: Any) -> int:
        return self.pos[id(node)]

    def nodes_of(self, op_type: str) -> list[Any]:
        return [n for n in self.nodes if n.op_type == op_type]

    def const_operand(self, node: Any) -> tuple[np.ndarray | None, str | None]:
        """For a binary node: (the constant operand, the other input), or (None, None)."""
        if len(node.input) != 2:
            return None, None
        a, b = (self.const(n) for n in node.input)
        if a is not None and b is None:
            return a, node.input[1]
        if b is not None and a is None:
            return b, node.input[0]
        return None, None

    def data_consumers(self, name: str) -> list[Any]:
        """The consumers of `name` that read its values (not Shape nodes reading its shape)."""
        return [n for n in self.consumers.get(name, []) if n.op_type != "Shape"]

    def only_consumer(self, name: str, op_type: str | tuple[str, ...]) -> Any | None:
        users = self.data_consumers(name)
        types = (op_type,) if isinstance(op_type, str) else op_type
        if len(users) == 1 and users[0].op_type in types:
            return users[0]
        return None

    def trace_back(self, name: str, through: tuple[str, ...] = LAYOUT_OPS) -> tuple[Any, str]:
        """Follows `name` to its producer through the `through` ops (first input); returns
        (that producer or None for a graph input / constant, the tensor it produces)."""
        while True:
            node = self.producer.get(name)
            if node is None or node.op_type not in through:
                return node, name
            name = node.input[0]

    def trace_forward(self, name: str, through: tuple[str, ...] = LAYOUT_OPS) -> list[Any]:
        """The first consumers of `name` that are not `through` ops (followed when a tensor has
        one consumer)."""
        while True:
            users = self.data_consumers(name)
            if len(users) == 1 and users[0].op_type in through:
                name = users[0].output[0]
                continue
            return users

    # ------------------------------------------------------------------ weighted ops

    def linears(self) -> list[Op]:
        ops = []
        for node in self.nodes:
            if node.op_type == "MatMul":
                w = self.const(node.input[1])
                if w is None or w.ndim != 2:
                    continue
                arrays, out, nodes = {"weight": w}, node.output[0], (node,)
                add = self.only_consumer(out, "Add")
                if add is not None:
                    b, _ = self.const_operand(add)
                    if b is not None and b.shape == (w.shape[1],):
                        arrays["bias"], out, nodes = b, add.output[0], (node, add)
                ops.append(Op("linear", arrays, node.input[0], out, {}, self.node_pos(node), nodes))
            elif node.op_type == "Gemm":
                w = self.const(node.input[1])
                a = self.attrs(node)
                if w is None or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0:
                    continue
                w = w.T if a.get("transB", 0) else w
                arrays = {"weight": w}
                if len(node.input) > 2 and node.input[2]:
                    b = self.const(node.input[2])
                    if b is None or a.get("beta", 1.0) != 1.0:
                        continue
                    arrays["bias"] = np.broadcast_to(b, (w.shape[1],)).copy()
                ops.append(
                    Op("linear", arrays, node.input[0], node.output[0], {}, self.node_pos(node))
                )
        return ops

    def convs(self) -> list[Op]:
        ops = []
        for node in self.nodes:
            if node.op_type not in ("Conv", "ConvTranspose"):
                continue
            w = self.const(node.input[1])
            if w is None:
                continue
            arrays, out, nodes = {"weight": w}, node.output[0], (node,)
            if len(node.input) > 2 and node.input[2]:
                b = self.const(node.input[2])
                if b is None:
                    continue
                arrays["bias"] = b
            kind = "conv" if node.op_type == "Conv" else "conv_transpose"
            attrs = self.attrs(node)
            bn = self.only_consumer(out, "BatchNormalization")
            if kind == "conv" and bn is not None:
                values = [self.const(n) for n in bn.input[1:5]]
                if all(v is not None for v in values):
                    for key, v in zip(("scale", "beta", "mean", "var"), values, strict=True):
                        arrays["bn_" + key] = v
                    attrs["bn_epsilon"] = self.attrs(bn).get("epsilon", 1e-5)
                    out, nodes = bn.output[0], (node, bn)
            ops.append(Op(kind, arrays, node.input[0], out, attrs, self.node_pos(node), nodes))
        return ops

    def norms(self) -> list[Op]:
        ops = []
        for node in self.nodes:
            if node.op_type == "LayerNormalization":
                scale = self.const(node.input[1])
                bias = self.const(node.input[2]) if len(node.input) > 2 else None
                if scale is None or (len(node.input) > 2 and node.input[2] and bias is None):
                    continue
                eps = self.attrs(node).get("epsilon", 1e-5)
                arrays = {"scale": scale.reshape(-1)}
                arrays["bias"] = (
                    np.zeros_like(arrays["scale"]) if bias is None else bias.reshape(-1)
                )
                attrs = {"eps": float(eps), "channels_first": False}
                pos = self.node_pos(node)
                ops.append(Op("norm", arrays, node.input[0], node.output[0], attrs, pos, (node,)))
            elif node.op_type == "Div":
                op = self._decomposed_norm(node)
                if op is not None:
                    ops.append(op)
        return sorted(ops, key=lambda o: o.pos)

    def _decomposed_norm(self, div: Any) -> Op | None:
        sub, sqrt = (self.producer.get(n) for n in div.input)
        if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
            return None
        mean = self.producer.get(sub.input[1])
        if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
            return None
        add_eps = self.producer.get(sqrt.input[0])
        eps = None if add_eps is None else self.const_operand(add_eps)[0]
        mul = self.only_consumer(div.output[0], "Mul")
        scale = None if mul is None else self.const_operand(mul)[0]
        if eps is None or scale is None:
            return None
        add = self.only_consumer(mul.output[0], "Add")
        bias = None if add is None else self.const_operand(add)[0]
        out = mul.output[0] if bias is None else add.output[0]
        axes = self.attrs(mean).get("axes")
        if axes is None and len(mean.input) > 1:
            axes = self.const(mean.input[1])
        axes = [int(a) for a in np.atleast_1d(axes)] if axes is not None else [-1]
        channels_first = axes == [1]
        flat = scale.reshape(-1)
        arrays = {"scale": flat, "bias": np.zeros_like(flat) if bias is None else bias.reshape(-1)}
        attrs = {"eps": float(eps), "channels_first": channels_first}
        first = min(self.node_pos(mean), self.node_pos(sub))
        return Op("norm", arrays, sub.input[0], out, attrs, first, (div, mul))


def _dims(value_info: Any) -> tuple[Any, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
