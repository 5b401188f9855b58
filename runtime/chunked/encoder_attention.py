"""`nadoo.EncoderAttention` in a session: dense or block-sparse by the policy, counted, exported.

The op holds no weights; it is built through this interface for what the interface gives a node:
the session's policy (`Policy.encoder_attention`, runtime/block_attention.py), per-call statistics
(`encoder_attention` in a run's stats: key blocks read, time), an ONNX export and the ORT engine's
classification. Dense, the node may run in ONNX Runtime (`whole_tiers` is {}: no tensor, nothing
selected); under a sparse policy it stays in NumPy, where the selection happens.
The kernel and its attributes: runtime/ops/encoder_attention.py.
"""
from __future__ import annotations

import time

import numpy as np

from .. import callstats
from ..errors import InputError
from ..block_attention import block_sparse_attention
from ..ops.encoder_attention import attention_attrs, check_inputs, dense_attention
from .base import ChunkedOp, register


class AttentionCounters:
    """One call's encoder-attention counts (callstats.state_for)."""

    __slots__ = ("calls", "blocks_read", "blocks_total", "seconds", "cpu_seconds", "numpy_calls")

    def __init__(self):
        self.calls = self.blocks_read = self.blocks_total = self.numpy_calls = 0
        self.seconds = self.cpu_seconds = 0.0


@register
class EncoderAttention(ChunkedOp):
    op_type = "EncoderAttention"

    def bind(self, node, ctx, env):
        self.heads, self.scale, self.zero_rows = attention_attrs(node, node.get("attrs") or {})
        self.name = node.get("name") or "EncoderAttention"
        self.policy = env.policy.encoder_attention

    def whole_tiers(self):
        return None if self.policy.active else {}

    def __call__(self, q, k, v, mask=None):
        check_inputs(self.name, self.heads, q, k, v, mask)
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.policy.active:
            out, read, total = block_sparse_attention(q, k, v, mask, self.heads, self.scale, self.zero_rows, self.policy)
        else:
            out = dense_attention(q, k, v, mask, self.heads, self.scale, self.zero_rows)
            read = total = self._blocks(q.shape[0], q.shape[1], k.shape[1])
        ac = callstats.state_for(self, AttentionCounters)
        ac.seconds += time.perf_counter() - t0
        ac.cpu_seconds += time.thread_time() - c0  # what a loaded machine does not inflate
        ac.calls += 1
        ac.numpy_calls += 1
        ac.blocks_read += read
        ac.blocks_total += total
        return out

    def output_shapes(self, x_shape: tuple) -> list[tuple]:
        return [tuple(x_shape)]  # [B, Sq, heads·D], as q

    def _blocks(self, batch: int, sq: int, sk: int) -> int:
        """Key blocks of a dense call, counted in the policy's blocks (one block per query block and
        head when no block size is set: the share read is what matters)."""
        size = self.policy.block or max(sq, sk, 1)
        return batch * self.heads * -(-sq // size) * -(-sk // size)

    def count_whole(self, x_shape: tuple, y_shape: tuple | None, macs: int | None = None) -> None:
        """One dense execution computed elsewhere (ONNX Runtime): every key block read, time not seen."""
        ac = callstats.state_for(self, AttentionCounters)
        ac.calls += 1
        n = self._blocks(x_shape[0], x_shape[1], x_shape[1]) if len(x_shape) == 3 else 0
        ac.blocks_read += n
        ac.blocks_total += n

    @classmethod
    def check_policy(cls, policy, bundle) -> None:
        if policy.encoder_attention.active and not any(n.get("op") == cls.op_type and n.get("domain") == cls.domain
                                                       for n in bundle.read_graph().get("nodes", [])):
            raise InputError("--attention blocks needs a bundle with fused encoder attention (EncoderAttention "
                             "nodes: an encoder compiled by this nadoo version); this one has none")

    @classmethod
    def extra_stats(cls, ops, call) -> dict | None:
        counts = [c for c in (call.states.get(op) for op in ops) if c is not None]
        if not counts:
            return None
        read, total = sum(c.blocks_read for c in counts), sum(c.blocks_total for c in counts)
        return {"encoder_attention": {
            **ops[0].policy.describe(), "layers": len(ops), "calls": sum(c.calls for c in counts),
            "numpy_calls": sum(c.numpy_calls for c in counts),
            "key_blocks_read": read, "key_blocks_total": total, "key_blocks_read_share": read / max(total, 1),
            # time inside the NumPy kernel; calls ONNX Runtime ran are inside its segments' time
            "attention_s": sum(c.seconds for c in counts), "attention_cpu_s": sum(c.cpu_seconds for c in counts)}}

    @classmethod
    def summary(cls, stats: dict) -> str | None:
        ea = stats.get("encoder_attention")
        if not ea or ea["kind"] == "dense":
            return None
        return (f"encoder attention {ea['kind']} (share {ea['share']:g}, block {ea['block']}): read "
                f"{ea['key_blocks_read_share']:.1%} of the key blocks, {ea['attention_s'] * 1e3:.1f} ms in attention")

    @classmethod
    def export(cls, node, ex) -> None:
        """For ONNX Runtime's engine, com.microsoft MultiHeadAttention (measured faster than the standard
        ops: 0.53 vs 0.64 ms per layer at batch 8 x 32 tokens, 75 vs 129 ms at 512, one thread); for a
        plain ONNX file and for shape inference (which knows no com.microsoft op), standard ops."""
        from ..ort_engine import SegmentExporter

        heads, scale, zero_rows = attention_attrs(node, node.get("attrs") or {})
        ins = list(node["inputs"]) + [""] * (4 - len(node["inputs"]))
        if isinstance(ex, SegmentExporter) and not ex.shapes_only:
            cls._export_mha(ex, ins[:4], node["outputs"][0], heads, scale, zero_rows)
        else:
            cls._export_standard(ex, ins[:4], node["outputs"][0], heads, scale, zero_rows)

    @staticmethod
    def _export_mha(ex, ins: list, out: str, heads: int, scale: float, zero_rows: bool) -> None:
        q, k, v, mask = ins
        bias = ""
        if mask:  # MultiHeadAttention takes the bias as [B|1, heads|1, Sq, Sk]: broadcast it to that
            ones, one = ex.fresh("ones"), ex.fresh("one")
            ex.initializer(ones, np.array([1, 1], "int64"))
            ex.initializer(one, np.array([1], "int64"))
            t = {n: ex.fresh(n) for n in ("qshape", "kshape", "sq", "sk", "bias_shape", "bias")}
            ex.add("Shape", [q], [t["qshape"]])
            ex.add("Shape", [k], [t["kshape"]])
            ex.add("Gather", [t["qshape"], one], [t["sq"]], axis=0)
            ex.add("Gather", [t["kshape"], one], [t["sk"]], axis=0)
            ex.add("Concat", [ones, t["sq"], t["sk"]], [t["bias_shape"]], axis=0)
            ex.add("Expand", [mask, t["bias_shape"]], [t["bias"]])
            bias = t["bias"]
        raw = ex.fresh("mha") if zero_rows else out
        ex.nodes.append(ex.helper.make_node("MultiHeadAttention", [q, k, v, "", "", bias], [raw],
                                            name=ex.fresh("MultiHeadAttention"), domain="com.microsoft",
                                            num_heads=heads, scale=float(scale)))
        ex.uses_ms = True
        if zero_rows:  # its rows whose every key is -inf are NaN; the source graph made them 0
            nan = ex.fresh("nan")
            ex.add("IsNaN", [raw], [nan])
            ex.add("Where", [nan, ex.constant(0.0), raw], [out])

    @staticmethod
    def _export_standard(ex, ins: list, out: str, heads: int, scale: float, zero_rows: bool) -> None:
        """Head split, scaled scores, mask, softmax, weighted sum, head merge."""
        q, k, v, mask = ins
        split, merge = ex.fresh("split_shape"), ex.fresh("merge_shape")
        ex.initializer(split, np.array([0, 0, heads, -1], "int64"))
        ex.initializer(merge, np.array([0, 0, -1], "int64"))
        t = {n: ex.fresh(n) for n in ("q4", "qh", "qs", "k4", "kt", "v4", "vh", "s", "sm", "p", "o", "ot", "nan")}
        for x, four, perm, heads_first in ((q, t["q4"], [0, 2, 1, 3], t["qh"]), (k, t["k4"], [0, 2, 3, 1], t["kt"]),
                                           (v, t["v4"], [0, 2, 1, 3], t["vh"])):
            ex.add("Reshape", [x, split], [four])
            ex.add("Transpose", [four], [heads_first], perm=perm)
        ex.add("Mul", [t["qh"], ex.constant(scale)], [t["qs"]])
        ex.add("MatMul", [t["qs"], t["kt"]], [t["s"]])
        scores = t["s"]
        if mask:
            ex.add("Add", [t["s"], mask], [t["sm"]])
            scores = t["sm"]
        probs = t["p"]
        ex.add("Softmax", [scores], [probs], axis=-1)
        if zero_rows:  # a row of -inf scores is NaN after Softmax; the source graph made it 0
            ex.add("IsNaN", [t["p"]], [t["nan"]])
            probs = ex.fresh("p0")
            ex.add("Where", [t["nan"], ex.constant(0.0), t["p"]], [probs])
        ex.add("MatMul", [probs, t["vh"]], [t["o"]])
        ex.add("Transpose", [t["o"]], [t["ot"]], perm=[0, 2, 1, 3])
        ex.add("Reshape", [t["ot"], merge], [out])
