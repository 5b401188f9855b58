"""What the ORT engine needs to know about standard ONNX operators, without importing `onnx`: which
operators an opset has (`in_opset`) and the element type of every value of a graph made of common
operators (`infer_types`). Both follow the ONNX operator specification: an operator exists in opset v
when its first version is at most v, and the type rules below are the operators' type constraints
(most keep their first input's type). A graph with any other operator gets None from `infer_types`,
and the engine asks onnx's own inference instead (runtime/ort_engine.py); tests/test_onnx_proto.py
checks the two agree.
"""
from __future__ import annotations

import numpy as np

__all__ = ["in_opset", "infer_types"]

# The ai.onnx operators and the opset each first appeared in (onnx 1.23's schemas).
FIRST_VERSION = {
    "Abs": 1, "Acos": 7, "Acosh": 9, "Add": 1, "AffineGrid": 20, "And": 1, "ArgMax": 1, "ArgMin": 1, "Asin": 7,
    "Asinh": 9, "Atan": 7, "Atanh": 9, "Attention": 23, "AveragePool": 1, "BatchNormalization": 1, "Bernoulli": 15,
    "BitCast": 26, "BitShift": 11, "BitwiseAnd": 18, "BitwiseNot": 18, "BitwiseOr": 18, "BitwiseXor": 18,
    "BlackmanWindow": 17, "Cast": 1, "CastLike": 15, "CausalConvWithState": 27, "Ceil": 1, "Celu": 12,
    "CenterCropPad": 18, "Clip": 1, "Col2Im": 18, "Compress": 9, "Concat": 1, "ConcatFromSequence": 11,
    "Constant": 1, "ConstantOfShape": 9, "Conv": 1, "ConvInteger": 10, "ConvTranspose": 1, "Cos": 7, "Cosh": 9,
    "CumProd": 26, "CumSum": 11, "DFT": 17, "DeformConv": 19, "DepthToSpace": 1, "DequantizeLinear": 10, "Det": 11,
    "Div": 1, "Dropout": 1, "DynamicQuantizeLinear": 11, "Einsum": 12, "Elu": 1, "Equal": 1, "Erf": 9, "Exp": 1,
    "Expand": 8, "EyeLike": 9, "Flatten": 1, "Floor": 1, "GRU": 1, "Gather": 1, "GatherElements": 11,
    "GatherND": 11, "Gelu": 20, "Gemm": 1, "GlobalAveragePool": 1, "GlobalLpPool": 1, "GlobalMaxPool": 1,
    "Greater": 1, "GreaterOrEqual": 12, "GridSample": 16, "GroupNormalization": 18, "HammingWindow": 17,
    "HannWindow": 17, "HardSigmoid": 1, "HardSwish": 14, "Hardmax": 1, "Identity": 1, "If": 1, "ImageDecoder": 20,
    "InstanceNormalization": 1, "IsInf": 10, "IsNaN": 9, "LRN": 1, "LSTM": 1, "LayerNormalization": 17,
    "LeakyRelu": 1, "Less": 1, "LessOrEqual": 12, "LinearAttention": 27, "Log": 1, "LogSoftmax": 1, "Loop": 1,
    "LpNormalization": 1, "LpPool": 1, "MatMul": 1, "MatMulInteger": 10, "Max": 1, "MaxPool": 1, "MaxRoiPool": 1,
    "MaxUnpool": 9, "Mean": 1, "MeanVarianceNormalization": 9, "MelWeightMatrix": 17, "Min": 1, "Mish": 18,
    "Mod": 10, "Mul": 1, "Multinomial": 7, "Neg": 1, "NegativeLogLikelihoodLoss": 12, "NonMaxSuppression": 10,
    "NonZero": 9, "Not": 1, "OneHot": 9, "Optional": 15, "OptionalGetElement": 15, "OptionalHasElement": 15,
    "Or": 1, "PRelu": 1, "Pad": 1, "Pow": 1, "QLinearConv": 10, "QLinearMatMul": 10, "QuantizeLinear": 10,
    "RMSNormalization": 23, "RNN": 1, "RandomNormal": 1, "RandomNormalLike": 1, "RandomUniform": 1,
    "RandomUniformLike": 1, "Range": 11, "Reciprocal": 1, "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1,
    "ReduceLogSumExp": 1, "ReduceMax": 1, "ReduceMean": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1,
    "ReduceSumSquare": 1, "RegexFullMatch": 20, "Relu": 1, "Reshape": 1, "Resize": 10, "ReverseSequence": 10,
    "RoiAlign": 10, "RotaryEmbedding": 23, "Round": 11, "STFT": 17, "Scan": 8, "Scatter": 9, "ScatterElements": 11,
    "ScatterND": 11, "Selu": 1, "SequenceAt": 11, "SequenceConstruct": 11, "SequenceEmpty": 11,
    "SequenceErase": 11, "SequenceInsert": 11, "SequenceLength": 11, "SequenceMap": 17, "Shape": 1, "Shrink": 9,
    "Sigmoid": 1, "Sign": 9, "Sin": 7, "Sinh": 9, "Size": 1, "Slice": 1, "Softmax": 1,
    "SoftmaxCrossEntropyLoss": 12, "Softplus": 1, "Softsign": 1, "SpaceToDepth": 1, "Split": 1,
    "SplitToSequence": 11, "Sqrt": 1, "Squeeze": 1, "StringConcat": 20, "StringNormalizer": 10, "StringSplit": 20,
    "Sub": 1, "Sum": 1, "SwiGLU": 28, "Swish": 24, "Tan": 7, "Tanh": 1, "TensorScatter": 24, "TfIdfVectorizer": 9,
    "ThresholdedRelu": 10, "Tile": 1, "TopK": 1, "Transpose": 1, "Trilu": 14, "Unique": 11, "Unsqueeze": 1,
    "Upsample": 1, "Where": 9, "Xor": 1,
}

# Output 0 (every output, for Split) has the type of input 0.
_SAME = set("""Abs Acos Acosh Add Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Concat Conv
ConvTranspose Cos Cosh CumSum DepthToSpace Div Dropout Einsum Elu Erf Exp Expand Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool HardSigmoid HardSwish Identity InstanceNormalization
LayerNormalization LeakyRelu Log LogSoftmax LpNormalization MatMul Max MaxPool Mean Min Mish Mod Mul Neg Pad Pow
PRelu Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize RMSNormalization Round ScatterElements ScatterND Selu Shrink Sigmoid
Sign Sin Sinh Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze""".split())
_BOOL = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
_INT64 = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
# Further outputs with a fixed type (other extra outputs are not typed here).
_EXTRA = {("TopK", 1): np.int64, ("MaxPool", 1): np.int64, ("Dropout", 1): np.bool_}

_ONNX_TO_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def in_opset(op: str, opset: int) -> bool:
    v = FIRST_VERSION.get(op)
    return v is not None and v <= opset


def _tensor_attr_dtype(a):
    if isinstance(a, dict) and "tensor" in a:
        return np.dtype(a["tensor"]["dtype"])
    return None


def _outputs(n: dict, t: dict):
    """[(output index, dtype)] of a node whose input types `t` gives, or None when no rule covers it."""
    op, ins, attrs = n["op"], n["inputs"], n.get("attrs") or {}
    first = t.get(ins[0]) if ins and ins[0] else None
    if op in _BOOL:
        return [(0, np.dtype(np.bool_))]
    if op in _INT64:
        return [(0, np.dtype(np.int64))]
    if op == "Cast":
        return [(0, np.dtype(_ONNX_TO_NP[int(attrs["to"])]))] if int(attrs.get("to", 0)) in _ONNX_TO_NP else None
    if op == "CastLike":
        return [(0, t[ins[1]])] if len(ins) > 1 and ins[1] in t else None
    if op == "Where":
        return [(0, t[ins[1]])] if len(ins) > 1 and ins[1] in t else None
    if op == "ConstantOfShape":
        return [(0, _tensor_attr_dtype(attrs.get("value")) or np.dtype(np.float32))]
    if op == "Constant":
        if "value" in attrs:
            return [(0, _tensor_attr_dtype(attrs["value"]))] if _tensor_attr_dtype(attrs["value"]) else None
        for k, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                      ("value_ints", np.int64)):
            if k in attrs:
                return [(0, np.dtype(dt))]
        return None
    if op in _SAME and first is not None:
        outs = range(len(n["outputs"])) if op == "Split" else [0]
        return [(k, first) for k in outs] + [(k, np.dtype(dt)) for (o, k), dt in _EXTRA.items() if o == op]
    return None


def infer_types(graph: dict, known: dict) -> dict | None:
    """`known` (value name -> dtype: inputs, constants, nadoo nodes' outputs) extended by every standard
    node's outputs, or None when a node is not covered (nadoo nodes are skipped: their outputs are in `known`)."""
    t = dict(known)
    for n in graph["nodes"]:
        if (n.get("domain", "") or "") == "nadoo":
            continue
        if (n.get("domain", "") or "") not in ("", "ai.onnx"):
            return None
        outs = _outputs(n, t)
        if outs is None:
            return None
        typed = {k for k, _ in outs}
        if any(o and k not in typed for k, o in enumerate(n["outputs"])):
            return None  # an extra output without a rule: all or nothing, so the result is onnx's
        for k, dt in outs:
            if k < len(n["outputs"]) and n["outputs"][k]:
                t.setdefault(n["outputs"][k], np.dtype(dt))
    return t
