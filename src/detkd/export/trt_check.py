"""Static check of an ONNX graph against TensorRT's ONNX parser support matrix.

TensorRT cannot be installed everywhere the export runs, so before (or instead of) building an engine
the exported graph is checked against the parser's operator matrix, kept in this package with the
TensorRT version it documents (``onnx-tensorrt-operators-trt10.15.md``, onnx/onnx-tensorrt
``docs/operators.md`` of the TensorRT 10.15 release, the newest published; TensorRT 11's parser changelogs
only add operators, and its opset ceiling is 25, so a graph that passes here parses on 11.x too). Operator names alone are not enough: torchvision's detection graphs use only
listed operators and still fail on the restrictions, so those a graph can show are checked too.

Contract: ``check_model(model) -> list[Violation]`` (empty when the graph passes); every violation
names the node, its operator and the rule. ``assert_tensorrt_compatible`` raises ``ExportError`` with
them. Rules (each tested on a graph that breaks it):

- ``opset``: the default-domain opset is inside the parser's range (9-24 for TensorRT 10.15);
- ``unsupported``: the operator is missing from the matrix or marked ``N``; operators of other domains
  need a plugin library (only TensorRT's built-in ``EfficientNMS_TRT`` plugin is accepted);
- ``type``: the operator's data tensor (its first input; the output for generators such as
  ``ConstantOfShape``; ``Where``'s X) has a type the matrix lists for it; UINT8 only as a network input
  or output; DOUBLE is let through (the parser casts it to FLOAT);
- ``constant-input``: inputs that the matrix's restriction column says must be an initializer or a
  constant (read from the table, so they follow its version: in 10.15 ``axes`` of Reduce*, Squeeze and
  Unsqueeze, CumSum's ``axis``, OneHot's ``depth``; Slice's and Pad's ``axes`` and TopK's ``K`` were
  relaxed and are no longer checked);
- ``topk``: ``K`` < 3840 (when it is a constant) and ``sorted`` = 1;
- ``loop``: no scan outputs unless the trip count is a constant; carried dependencies keep their shape;
- ``if``: both branches give outputs of equal rank and with different names;
- ``pooling``: MaxPool without its ``Indices`` output; Max/Average/LpPool dilations all ones;
  Max/AveragePool 2-D or 3-D;
- ``resize``: supported coordinate transformation, mode, nearest mode and aspect-ratio policy;
- ``attribute``: ScatterND without ``reduction``; Constant without sparse or string values; Dropout not
  in training; Quantize/DequantizeLinear with zero zero-points;
- ``static-shape``: every graph input is static apart from its first (batch) dimension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

from detkd.errors import ExportError

MATRIX_FILE = "onnx-tensorrt-operators-trt10.15.md"
TRT_VERSION = "10.15"
BUILTIN_PLUGINS = {"EfficientNMS_TRT"}
TOPK_MAX = 3840

# ONNX TensorProto element types -> the matrix's type names
_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16"}
_OUTPUT_TYPED = {"ConstantOfShape", "RandomNormal", "RandomUniform", "Constant", "EyeLike"}
_DATA_INPUT = {"Where": 1}
# op -> (input index, what the matrix calls it): checked to be a constant when the matrix's restriction for
# the op says that this input "must be" an initializer / a (build-time) constant / resolvable to a constant
_CONSTANT_INPUTS = {
    **{op: (1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                                  "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze")},
    "Slice": (3, "axes"), "Pad": (3, "axes"), "CumSum": (1, "axis"), "TopK": (1, "K"), "OneHot": (1, "depth"),
}
_CONSTANT_WORDING = re.compile(r"must be (an initializer|a constant|a build-time constant|resolvable to a constant)")
_RESIZE = {
    "coordinate_transformation_mode": ({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                        "align_corners"}, "half_pixel"),
    "mode": ({"nearest", "linear"}, "nearest"),
    "nearest_mode": ({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}, "round_prefer_floor"),
    "keep_aspect_ratio_policy": ({"stretch"}, "stretch"),
}


@dataclass(frozen=True)
class OpSupport:
    supported: bool
    types: frozenset[str]
    restrictions: str


@dataclass(frozen=True)
class SupportMatrix:
    version: str
    opset_range: tuple[int, int]
    ops: dict[str, OpSupport]


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"node '{self.node}' ({self.op}) breaks TensorRT {TRT_VERSION} rule '{self.rule}': {self.message}"


def parse_matrix(text: str, version: str = TRT_VERSION) -> SupportMatrix:
    """Parse onnx-tensorrt's ``operators.md`` table (``| Op | Y/N | types | restrictions |``)."""
    ops = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N") or not re.fullmatch(r"[A-Za-z0-9_]+", cells[0]):
            continue
        types = frozenset(t.strip().replace("INF64", "INT64")  # the source's typo for ConstantOfShape
                          for t in (cells[2] if len(cells) > 2 else "").split(",") if t.strip())
        ops[cells[0]] = OpSupport(cells[1] == "Y", types, cells[3] if len(cells) > 3 else "")
    found = re.search(r"range of opset (\d+) to opset (\d+)", text)
    if not ops or not found:
        raise ValueError("not an onnx-tensorrt operator matrix (no operator table or opset range found)")
    stated = re.search(r"TensorRT (\d+(?:\.\d+)*) supports operators", text)
    return SupportMatrix(stated.group(1) if stated else version, (int(found.group(1)), int(found.group(2))), ops)


@lru_cache(maxsize=1)
def default_matrix() -> SupportMatrix:
    return parse_matrix(resources.files("detkd.export").joinpath(MATRIX_FILE).read_text())


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


class _Graph:
    """Name -> type / shape / constant lookups for one (sub)graph, with its parent's as fallback."""

    def __init__(self, graph, parent: Optional["_Graph"] = None):
        self.parent = parent
        self.constants = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                self.constants[node.output[0]] = node
        self.values = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}
        self.io = {v.name for v in (*graph.input, *graph.output)}

    def is_constant(self, name: str) -> bool:
        return name in self.constants or (self.parent is not None and self.parent.is_constant(name))

    def constant_value(self, name: str):
        from onnx import numpy_helper

        if name in self.constants:
            c = self.constants[name]
            if hasattr(c, "op_type"):  # a Constant node
                value = _attr(c, "value")
                return None if value is None else numpy_helper.to_array(value)
            return numpy_helper.to_array(c)
        return self.parent.constant_value(name) if self.parent else None

    def elem_type(self, name: str) -> Optional[int]:
        if name in self.values and self.values[name].type.HasField("tensor_type"):
            return self.values[name].type.tensor_type.elem_type or None
        if name in self.constants and not hasattr(self.constants[name], "op_type"):
            return self.constants[name].data_type
        return self.parent.elem_type(name) if self.parent else None

    def rank(self, value_info) -> Optional[int]:
        t = value_info.type.tensor_type
        return len(t.shape.dim) if t.HasField("shape") else None


def check_model(model, matrix: Optional[SupportMatrix] = None) -> list[Violation]:
    """Every rule of the module docstring on ``model`` (shape inference runs first, for types)."""
    import onnx

    matrix = matrix or default_matrix()
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot follow is still checked op by op
        pass
    out = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = matrix.opset_range
    if opset is not None and not lo <= opset <= hi:
        out.append(Violation("<model>", "opset", "opset", f"default-domain opset {opset} is outside {lo}-{hi}"))
    out += _check_inputs_static(model.graph)
    out += _check_graph(model.graph, matrix, None)
    return out


def _check_inputs_static(graph) -> list[Violation]:
    out = []
    for inp in graph.input:
        if not inp.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if axis > 0 and not dim.HasField("dim_value"):
                name = dim.dim_param or "?"
                out.append(Violation(inp.name, "graph input", "static-shape",
                                     f"dimension {axis} is dynamic ('{name}'); only the batch dimension may be"))
    return out


def _check_graph(graph, matrix: SupportMatrix, parent: Optional[_Graph]) -> list[Violation]:
    g = _Graph(graph, parent)
    out = []
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        out += [Violation(name, node.op_type, rule, msg) for rule, msg in _check_node(node, g, matrix)]
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.type == attr.GRAPH:
                out += _check_graph(attr.g, matrix, g)
    return out


def _check_node(node, g: _Graph, matrix: SupportMatrix):
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        if op not in BUILTIN_PLUGINS:
            yield "unsupported", f"custom-domain operator '{node.domain}::{op}' needs a plugin library"
        return
    support = matrix.ops.get(op)
    if support is None or not support.supported:
        yield "unsupported", f"the TensorRT {matrix.version} ONNX parser does not support {op}"
        return
    yield from _check_type(node, g, support)
    if op in _CONSTANT_INPUTS and requires_constant(support, _CONSTANT_INPUTS[op][1]):
        index, what = _CONSTANT_INPUTS[op]
        if len(node.input) > index and node.input[index] and not g.is_constant(node.input[index]):
            yield "constant-input", f"input '{what}' ({node.input[index]}) must be a constant (initializer or Constant)"
    checker = _RULES.get(op)
    if checker:
        yield from checker(node, g)


def requires_constant(support: OpSupport, what: str) -> bool:
    """Whether the matrix's restriction text says that input ``what`` must be an initializer or constant."""
    text = support.restrictions
    return f"`{what}`" in text and bool(_CONSTANT_WORDING.search(text.split(f"`{what}`", 1)[1]))


def _check_type(node, g: _Graph, support: OpSupport):
    if not support.types:
        return
    names = list(node.output) if node.op_type in _OUTPUT_TYPED else list(node.input)
    index = _DATA_INPUT.get(node.op_type, 0)
    if len(names) <= index or not names[index]:
        return
    code = g.elem_type(names[index])
    kind = _ONNX_TYPES.get(code) if code else None
    if kind is None or kind == "DOUBLE":
        return
    if kind == "UINT8" and names[index] not in g.io:
        yield "type", f"UINT8 tensor '{names[index]}' is only supported as a network input or output"
    elif kind not in support.types and kind != "UINT8":
        yield "type", f"{kind} tensor '{names[index]}' is not supported (allowed: {', '.join(sorted(support.types))})"


def _check_topk(node, g: _Graph):
    if _attr(node, "sorted", 1) != 1:
        yield "topk", "'sorted' must be 1"
    if len(node.input) > 1 and g.is_constant(node.input[1]):
        k = g.constant_value(node.input[1])
        if k is not None and int(k.reshape(-1)[0]) >= TOPK_MAX:
            yield "topk", f"K = {int(k.reshape(-1)[0])} must be less than {TOPK_MAX}"


def _check_loop(node, g: _Graph):
    body = _attr(node, "body")
    n_carried = len(node.input) - 2
    n_scan = len(node.output) - n_carried
    trip = node.input[0] if node.input else ""
    if n_scan > 0 and (not trip or not g.is_constant(trip)):
        yield "loop", f"{n_scan} scan output(s) with a trip count that is not a constant: their length is dynamic"
    for k in range(n_carried):
        v_in, v_out = body.input[k + 2], body.output[k + 1]
        s_in, s_out = _dims(v_in), _dims(v_out)
        if s_in is not None and s_out is not None and s_in != s_out:
            yield "loop", f"carried dependency '{v_in.name}' changes shape across iterations ({s_in} -> {s_out})"


def _dims(value_info) -> Optional[tuple]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def _check_if(node, g: _Graph):
    then_b, else_b = _attr(node, "then_branch"), _attr(node, "else_branch")
    for t_out, e_out in zip(then_b.output, else_b.output):
        if t_out.name == e_out.name:
            yield "if", f"both branches name their output '{t_out.name}'; the names must differ"
        rt, re_ = g.rank(t_out), g.rank(e_out)
        if rt is not None and re_ is not None and rt != re_:
            yield "if", f"branch outputs '{t_out.name}' and '{e_out.name}' have ranks {rt} and {re_}; they must match"


def _check_pool(node, g: _Graph):
    dilations = _attr(node, "dilations")
    if dilations and any(d != 1 for d in dilations):
        yield "pooling", f"dilations {list(dilations)} must be empty or all ones"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        yield "pooling", "the 'Indices' output is unsupported"
    kernel = _attr(node, "kernel_shape")
    if node.op_type in ("MaxPool", "AveragePool") and kernel is not None and len(kernel) not in (2, 3):
        yield "pooling", f"{len(kernel)}-D pooling; only 2-D or 3-D is supported"


def _check_resize(node, g: _Graph):
    for attr, (allowed, default) in _RESIZE.items():
        value = _attr(node, attr, default)
        if value not in allowed:
            yield "resize", f"{attr} '{value}' is unsupported (allowed: {', '.join(sorted(allowed))})"


def _check_attributes(node, g: _Graph):
    op = node.op_type
    if op == "ScatterND" and _attr(node, "reduction", "none") != "none":
        yield "attribute", f"reduction '{_attr(node, 'reduction')}' is not supported"
    if op == "Constant":
        for bad in ("sparse_value", "value_string", "value_strings"):
            if _attr(node, bad) is not None:
                yield "attribute", f"attribute '{bad}' is unsupported"
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        value = g.constant_value(node.input[2]) if g.is_constant(node.input[2]) else None
        if value is None or bool(value):
            yield "attribute", "'training_mode' must be an initializer that is False"
    if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
        value = g.constant_value(node.input[2]) if g.is_constant(node.input[2]) else None
        if value is None or value.any():
            yield "attribute", "the zero point must be a constant zero"


_RULES = {"TopK": _check_topk, "Loop": _check_loop, "If": _check_if, "MaxPool": _check_pool,
          "AveragePool": _check_pool, "LpPool": _check_pool, "Resize": _check_resize,
          "ScatterND": _check_attributes, "Constant": _check_attributes, "Dropout": _check_attributes,
          "QuantizeLinear": _check_attributes, "DequantizeLinear": _check_attributes}


def assert_tensorrt_compatible(model, source: str, limit: int = 5) -> None:
    """Raise ``ExportError`` naming ``source`` and the first ``limit`` violations (one line)."""
    violations = check_model(model)
    if violations:
        shown = "; ".join(str(v) for v in violations[:limit])
        more = f" (and {len(violations) - limit} more)" if len(violations) > limit else ""
        raise ExportError(f"{source}: not loadable by TensorRT {TRT_VERSION}'s ONNX parser: {shown}{more}")
