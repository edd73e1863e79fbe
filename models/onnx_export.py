"""A layer range of a Llama model as an ONNX graph, for TensorRT (and checked on the CPU by onnxruntime).

The graph is the NumPy reference's formulas (kernels/reference.py) written as ONNX operators, one
layer after another, with the weights dequantized to float initializers:

    inputs   hidden [T, D], cos/sin [T, E/2] (reference.rope_tables of the T positions),
             mask [T, S] (0 where a query sees a key, -1e9 where not), past_k/past_v [L, P, G, E]
    outputs  hidden_out [T, D], present_k/present_v [L, S, G, E]        (S = P + T)

so one graph serves a prompt (P = 0) and decoding (T = 1, the cache so far as past). Opset 17, the
newest that TensorRT 8.6 and later all parse.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels.dequant import dequantize
from models.errors import UnsupportedModelError
from models.gguf_file import GGUFModelFile
from models.llama import LlamaConfig

OPSET = 17
MASKED = -1e9


class _Graph:
    """Nodes and initializers under construction, with fresh names."""

    def __init__(self, weight_dtype: type):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weight_dtype = weight_dtype
        self._n = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        self._n += 1
        name = name or f"const_{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def shape(self, *dims: int) -> str:
        return self.const(np.array(dims, dtype=np.int64))

    def weight(self, value: np.ndarray, name: str) -> str:
        """A float initializer, cast to float32 in the graph when stored narrower."""
        stored = self.const(value.astype(self.weight_dtype), name)
        return stored if self.weight_dtype == np.float32 else self.op("Cast", stored, to=TensorProto.FLOAT)


def _rmsnorm(g: _Graph, x: str, weight: str, eps: float) -> str:
    mean_sq = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", mean_sq, g.const(np.float32(eps))))), weight)


def _rope(g: _Graph, x: str, heads: int, head_dim: int, cos: str, sin: str) -> str:
    """Each adjacent pair (x[2i], x[2i+1]) of a head turned by its angle; x [T, heads*E] -> [T, heads, E]."""
    pairs = g.op("Reshape", x, g.shape(0, heads, head_dim // 2, 2))
    x0 = g.op("Slice", pairs, g.const(np.array([0])), g.const(np.array([1])), g.const(np.array([-1])))
    x1 = g.op("Slice", pairs, g.const(np.array([1])), g.const(np.array([2])), g.const(np.array([-1])))
    r0 = g.op("Sub", g.op("Mul", x0, cos), g.op("Mul", x1, sin))
    r1 = g.op("Add", g.op("Mul", x0, sin), g.op("Mul", x1, cos))
    return g.op("Reshape", g.op("Concat", r0, r1, axis=-1), g.shape(0, heads, head_dim))


def _attention(g: _Graph, q: str, k: str, v: str, mask: str, c: LlamaConfig) -> str:
    """Grouped-query attention: q [T, H, E], k/v [S, G, E], mask [T, S] -> [T, H*E]."""
    H, G, E = c.n_heads, c.n_kv_heads, c.head_dim
    qg = g.op("Transpose", g.op("Reshape", q, g.shape(0, G, H // G, E)), perm=[1, 2, 0, 3])  # [G, group, T, E]
    kt = g.op("Unsqueeze", g.op("Transpose", k, perm=[1, 2, 0]), g.const(np.array([1])))  # [G, 1, E, S]
    vt = g.op("Unsqueeze", g.op("Transpose", v, perm=[1, 0, 2]), g.const(np.array([1])))  # [G, 1, S, E]
    scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, kt), g.const(np.float32(1 / math.sqrt(E)))), mask)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), vt)  # [G, group, T, E]
    return g.op("Reshape", g.op("Transpose", out, perm=[2, 0, 1, 3]), g.shape(0, H * E))


def export_range(file: GGUFModelFile, start: int, stop: int, weight_dtype: type = np.float32) -> onnx.ModelProto:
    """Layers [start, stop) of the model in `file` as one ONNX graph (see the module docstring)."""
    c = LlamaConfig.from_file(file)
    if c.features:  # the graph is the plain Llama block's (models/arch.py)
        raise UnsupportedModelError(f"the ONNX export does not write {', '.join(c.features)} ({c.arch})")
    if not 0 <= start < stop <= c.n_layers:
        raise ValueError(f"layer range [{start}, {stop}) is outside [0, {c.n_layers})")
    g = _Graph(weight_dtype)
    D, H, G, E, L = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, stop - start

    def weight(i: int, part: str, transpose: bool) -> str:
        t = file.tensors[f"blk.{i}.{part}.weight"]
        w = dequantize(t.raw, t.qtype, t.shape)
        return g.weight(np.ascontiguousarray(w.T if transpose else w), f"blk.{i}.{part}")

    cos = g.op("Unsqueeze", "cos", g.const(np.array([1, 3])))  # [T, 1, E/2, 1]
    sin = g.op("Unsqueeze", "sin", g.const(np.array([1, 3])))
    x, presents_k, presents_v = "hidden", [], []
    for n, i in enumerate(range(start, stop)):
        h = _rmsnorm(g, x, weight(i, "attn_norm", False), c.norm_eps)
        q = _rope(g, g.op("MatMul", h, weight(i, "attn_q", True)), H, E, cos, sin)
        k = _rope(g, g.op("MatMul", h, weight(i, "attn_k", True)), G, E, cos, sin)
        v = g.op("Reshape", g.op("MatMul", h, weight(i, "attn_v", True)), g.shape(0, G, E))
        layer = g.const(np.array(n, dtype=np.int64))
        k_all = g.op("Concat", g.op("Gather", "past_k", layer, axis=0), k, axis=0)  # [S, G, E]
        v_all = g.op("Concat", g.op("Gather", "past_v", layer, axis=0), v, axis=0)
        presents_k.append(g.op("Unsqueeze", k_all, g.const(np.array([0]))))
        presents_v.append(g.op("Unsqueeze", v_all, g.const(np.array([0]))))
        attended = _attention(g, q, k_all, v_all, "mask", c)
        x = g.op("Add", x, g.op("MatMul", attended, weight(i, "attn_output", True)))
        h = _rmsnorm(g, x, weight(i, "ffn_norm", False), c.norm_eps)
        gate = g.op("MatMul", h, weight(i, "ffn_gate", True))
        up = g.op("MatMul", h, weight(i, "ffn_up", True))
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, g.op("MatMul", act, weight(i, "ffn_down", True)))
    g.nodes.append(helper.make_node("Identity", [x], ["hidden_out"]))
    g.nodes.append(helper.make_node("Concat", presents_k, ["present_k"], axis=0))
    g.nodes.append(helper.make_node("Concat", presents_v, ["present_v"], axis=0))

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("hidden", f32, ["T", D]),
        helper.make_tensor_value_info("cos", f32, ["T", E // 2]),
        helper.make_tensor_value_info("sin", f32, ["T", E // 2]),
        helper.make_tensor_value_info("mask", f32, ["T", "S"]),
        helper.make_tensor_value_info("past_k", f32, [L, "P", G, E]),
        helper.make_tensor_value_info("past_v", f32, [L, "P", G, E]),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden_out", f32, ["T", D]),
        helper.make_tensor_value_info("present_k", f32, [L, "S", G, E]),
        helper.make_tensor_value_info("present_v", f32, [L, "S", G, E]),
    ]
    graph = helper.make_graph(g.nodes, f"llama_layers_{start}_{stop}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="appliance")
    model.ir_version = 8  # readable by onnxruntime and TensorRT releases of the last years
    return model


def causal_mask(past: int, new: int) -> np.ndarray:
    """[new, past + new]: query t (at position past + t) sees keys 0 .. past + t."""
    visible = np.arange(past + new)[None, :] <= (past + np.arange(new))[:, None]
    return np.where(visible, 0.0, MASKED).astype(np.float32)


def range_inputs(
    hidden: np.ndarray, past_k: np.ndarray, past_v: np.ndarray, config: LlamaConfig
) -> dict[str, np.ndarray]:
    """The graph's inputs for T new hidden states after P cached positions."""
    from kernels.reference import rope_tables

    T, P = hidden.shape[0], past_k.shape[1]
    cos, sin = rope_tables(np.arange(P, P + T), config.inv_freq, config.rope_attn_factor)
    return {
        "hidden": hidden.astype(np.float32),
        "cos": cos,
        "sin": sin,
        "mask": causal_mask(P, T),
        "past_k": past_k.astype(np.float32),
        "past_v": past_v.astype(np.float32),
    }


def empty_cache(config: LlamaConfig, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (n_layers, 0, config.n_kv_heads, config.head_dim)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
