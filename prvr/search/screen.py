"""Low-precision screens for the exact engine: every clip score of a query, cheaply, each
within a rigorous error bound, so that `ExactSearch` can certify its top-k.

A screen answers two questions for the queries of one call:

* ``clips(state, start, end)``: screened clip scores (Q, n, K) of videos start..end and a
  bound ``err`` (broadcastable to (Q, n)) with |screened - exact fp32 cosine| <= err;
* ``frame_ub(state, near, start)``: an upper bound (Q, n) on each video's exact frame score
  over its clips marked in ``near`` (the clips that may be its key clip).

`Bf16Screen` keeps a bfloat16 copy of both arrays (2 bytes per value) and uses native bf16
products; `Int8Screen` keeps int8 copies (1 byte per value, a scale and a residual norm per
row; the clips once more in ONNX Runtime's pre-packed form) and exact integer products
(MatMulInteger): half the memory traffic of bf16 on the memory-bound single-query screen.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Bf16Screen", "Int8Screen", "BF16_OUT_REL", "bf16_supported"]

# Error of a bf16 product q~.c~ against the fp32 q.c (Cauchy-Schwarz, no cancellation assumed):
#   |q~.c~ - q.c| <= ||q~ - q|| ||c~|| + ||q|| ||c~ - c||  (input rounding, measured exactly)
#                  + 2^-8 |x| (bf16 output rounding: 8 significant bits) + H 2^-24 (fp32 accumulation).
BF16_OUT_REL = 2.0 ** -8 * 1.01       # (fp32 accumulation and one rounding: checked at init)
# Rounding of the fp32 arithmetic that turns exact int32 products into scores: a few ulps of
# values of magnitude <= max(1, largest row norm); this is far above its true size.
_INT8_ROUNDING = 1e-6


def bf16_supported() -> bool:
    """Native bf16 matmuls (AVX-512 BF16 / AMX): otherwise bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds
        return False


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """fp32 tensor view of an array slice (no copy for fp32 mmaps; they are only read)."""
    return _view(np.asarray(arr, np.float32))


def _view(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing a (read-only, memory-mapped) array's memory and dtype; only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr))


def _near_rows(near: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, video in chunk, flat row in the whole array) of every clip marked in near (Q, n, K)."""
    Q, n, K = near.shape
    flat = near.view(-1).nonzero().squeeze(1)                                               # (R,)
    if Q == 1:
        return torch.zeros_like(flat), flat // K, flat + start * K
    rem = flat % (n * K)
    return flat // (n * K), rem // K, rem + start * K


def _video_max(values: torch.Tensor, qi: torch.Tensor, vi: torch.Tensor, Q: int, n: int) -> torch.Tensor:
    """Max of per-row values over each (query, video) pair: (R,) -> (Q, n), -inf where none."""
    out = torch.full((Q * n,), float("-inf"))
    return out.scatter_reduce_(0, qi * n + vi, values, "amax", include_self=True).view(Q, n)


# ----------------------------------------------------------------------------------- bf16
class Bf16Screen:
    """bf16 copies of both arrays; bound: input rounding (measured) + output rounding 2^-8 |x|.

    A single query screens with a bf16 matrix-vector product (memory-bound: about twice as fast
    as the same one-row matrix product), when this build accumulates it in fp32 (checked)."""

    def __init__(self, clips: np.ndarray, attended: np.ndarray, K: int, gather_queries: int = 4):
        self.K, self.H, self.gather_queries = K, clips.shape[1], gather_queries
        self.c16, self.c_err, self.c_norm = self._low_copy(clips)            # (N*K, H) bfloat16
        self.a16, self.a_err, self.a_norm = self._low_copy(attended)
        self.mv = self._mv_accumulates_in_fp32()

    @staticmethod
    def _low_copy(arr: np.ndarray, rows: int = 1 << 16) -> tuple[torch.Tensor, float, float]:
        """bf16 copy, max ||low(x) - x|| and max ||low(x)|| over rows (for the bound)."""
        out = torch.empty(arr.shape, dtype=torch.bfloat16)
        err = norm = 0.0
        for i in range(0, arr.shape[0], rows):
            x = _tensor(arr[i:i + rows])
            out[i:i + rows] = xb = x.bfloat16()
            err = max(err, float((xb.float() - x).norm(dim=-1).max()))
            norm = max(norm, float(xb.float().norm(dim=-1).max()))
        return out, err * 1.001, norm * 1.001

    def _mv_accumulates_in_fp32(self, rows: int = 4096) -> bool:
        """The bound assumes fp32 accumulation and one bf16 rounding of each output; a build
        whose matrix-vector product does otherwise would break it, so check on real rows and
        keep the one-row matrix product if it does not hold."""
        g = torch.Generator().manual_seed(0)
        qb = F.normalize(torch.randn(4, self.H, generator=g), dim=-1).bfloat16()
        c = self.c16[:rows]
        got = torch.stack([torch.mv(c, qb[i]) for i in range(len(qb))]).double()
        ref = qb.double() @ c.double().T
        return bool(((got - ref).abs() <= BF16_OUT_REL * ref.abs() + self.H * 2.0 ** -24).all())

    def prepare(self, q: torch.Tensor) -> dict:
        qb = q.bfloat16()
        dq = (qb.float() - q).norm(dim=-1) * 1.001                                         # (Q,)
        acc = self.H * 2.0 ** -24
        return {"qb": qb, "e_c": (dq * self.c_norm + self.c_err + acc)[:, None],
                "e_a": (dq * self.a_norm + self.a_err + acc)[:, None]}

    def products(self, qb: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """bf16 clip products of rows start..end as fp32 (Q, rows)."""
        clips = self.c16[start:end]
        if len(qb) == 1 and self.mv:
            return torch.mv(clips, qb[0]).float()[None]
        return F.linear(qb, clips).float()

    def clips(self, state: dict, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.K
        s = self.products(state["qb"], start * K, end * K).view(len(state["qb"]), end - start, K)
        # output rounding matters only near each video's max: |x| <= max|smax| + window
        big = s.amax(-1).abs().amax(1, keepdim=True) + 2 * (state["e_c"] + 2 * BF16_OUT_REL)   # (Q, 1)
        return s, state["e_c"] + BF16_OUT_REL * big

    def frame_ub(self, state: dict, near: torch.Tensor, start: int) -> torch.Tensor:
        """Few queries: gather only the near clips' attended vectors (about one per video),
        half the memory traffic of a full product. Many: one bf16 product is cheaper."""
        qb, (Q, n, K) = state["qb"], near.shape
        if Q > self.gather_queries:
            f = F.linear(qb, self.a16[start * K:(start + n) * K]).float().view(Q, n, K)
            fmax = torch.where(near, f, float("-inf")).amax(-1)
        else:
            qi, vi, rows = _near_rows(near, start)
            a = self.a16.index_select(0, rows)                                             # (R, H)
            if Q == 1 and self.mv:                                   # bf16 output: within the bound
                fv = torch.mv(a, qb[0]).float()
            else:
                fv = (a.float() @ qb.float().T).gather(1, qi[:, None]).squeeze(1)
            fmax = _video_max(fv, qi, vi, Q, n)
        return fmax + state["e_a"] + BF16_OUT_REL * fmax.abs()


# ----------------------------------------------------------------------------------- int8
def _quantize_rows(arr: np.ndarray, rows: int = 1 << 13) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Symmetric int8 per row: x ~ scale * q. Returns q (R, H) int8, scale (R,) fp32, the
    residual norm ||x - scale q|| per row (rounded up) and max ||x|| (in float64)."""
    R, H = arr.shape
    q, scale, resid = np.empty((R, H), np.int8), np.empty(R, np.float32), np.empty(R, np.float32)
    norm = 0.0
    for i in range(0, R, rows):
        x = np.asarray(arr[i:i + rows], np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"rows {i}..{i + len(x) - 1} hold a value that is not finite (NaN or inf): "
                             "an index to screen must be finite")
        s = (np.abs(x).max(1) / 127).astype(np.float32)
        s[s == 0] = 1.0                                                # an all-zero row: q = 0
        qi = np.clip(np.rint(x / s[:, None]), -127, 127)
        q[i:i + rows], scale[i:i + rows] = qi, s
        resid[i:i + rows] = np.linalg.norm(x - s[:, None].astype(np.float64) * qi, axis=1) * 1.001
        norm = max(norm, float(np.linalg.norm(x, axis=1).max()))
    return q, scale, resid, norm * 1.001


def _row_scale(x: np.ndarray) -> np.ndarray:
    """max|x| / 127 per row (Q, 1), rounded to the fp32 value ONNX Runtime multiplies by, so
    that s q is exactly the vector whose products it computes."""
    return np.maximum(np.abs(x).max(1, keepdims=True) / 127, 1e-30).astype(np.float32).astype(np.float64)


def _external(name: str, arr: np.ndarray, opts: ort.SessionOptions) -> TensorProto:
    """A graph initializer whose data ONNX Runtime reads from `arr` itself, not from a copy in
    the serialized model (which would cost several times the array in RAM). The caller keeps
    `arr` alive as long as the session."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape,
                    data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=f"{name}.bin")       # never read: supplied below
    opts.add_external_initializers([name], [ort.OrtValue.ortvalue_from_numpy(arr)])
    return t


def _matmul_integer(weights: np.ndarray | None, scale: np.ndarray | None, threads: int):
    """An ONNX Runtime session: exact int32 products of int8 rows, turned into scores in fp32.
    Query i is the row pair (2i, 2i+1) of int8 values q1, q2 with scales s = (s1, s2) (Q, 2).

    With `weights` (H, R) int8 (pre-packed once; kept alive by the caller) and their per-row
    `scale` (R,): (A uint8 (2Q, H) = q + 128, s) -> (s1 y1 + s2 y2) * scale   (Q, R), where
    y = (A - 128) @ weights. Without: (A uint8 (R, H) = rows + 128, B int8 (H, 2Q) = query
    columns, s) -> s1 y1 + s2 y2   (R, Q), where y = (A - 128) @ B."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # no busy cores after a call
    f32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, None]), f32("s", [None, 2])]
    inits = [helper.make_tensor("zero", TensorProto.UINT8, [], [128])]
    nodes = [helper.make_node("MatMulInteger", ["A", "B", "zero"], ["Y"]),
             helper.make_node("Cast", ["Y"], ["Yf"], to=TensorProto.FLOAT)]
    if weights is None:                             # (R, 2Q) -> (R, Q, 2) * s -> sum over the pair
        inputs.append(helper.make_tensor_value_info("B", TensorProto.INT8, [None, None]))
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [3], [0, -1, 2]))
        nodes += [helper.make_node("Reshape", ["Yf", "shape"], ["Y3"]), helper.make_node("Mul", ["Y3", "s"], ["P"]),
                  helper.make_node("ReduceSum", ["P", "axis"], ["S"], keepdims=0)]
        inits.append(helper.make_tensor("axis", TensorProto.INT64, [1], [2]))
    else:                                           # (2Q, R) -> (Q, 2, R) * s[..., None] -> sum
        inits += [_external("B", weights, opts), numpy_helper.from_array(scale, "scale"),
                  helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 2, weights.shape[1]]),
                  helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
                  helper.make_tensor("last", TensorProto.INT64, [1], [2])]
        nodes += [helper.make_node("Reshape", ["Yf", "shape"], ["Y3"]), helper.make_node("Unsqueeze", ["s", "last"], ["s3"]),
                  helper.make_node("Mul", ["Y3", "s3"], ["P"]),
                  helper.make_node("ReduceSum", ["P", "axis"], ["PS"], keepdims=0),
                  helper.make_node("Mul", ["PS", "scale"], ["S"])]
    graph = helper.make_graph(nodes, "screen", inputs, [f32("S", [None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Int8Screen:
    """int8 copies of both arrays (x ~ s_r q_r per row) and exact integer products.

    The query is split in two int8 rows, q = s1 q1 + s2 q2 + d (the second quantizes the
    first's remainder, so ||d|| ~ 1e-4), both scored in one pass over the weights. Then
    |q.x - (s1 q1 + s2 q2).s_r q_r| <= ||q~|| ||x - s_r q_r|| + ||d|| ||x|| + rounding.
    The clip side uses each video's largest residual norm, the frame side each row's."""

    def __init__(self, clips: np.ndarray, attended: np.ndarray, K: int, video_chunk: int,
                 threads: int | None = None, gather_queries: int = 4):
        self.K, self.H, self.video_chunk, self.gather_queries = K, clips.shape[1], video_chunk, gather_queries
        threads = threads or torch.get_num_threads()
        cq, cs, cr, self.c_norm = _quantize_rows(clips)
        self.c_resid = torch.from_numpy(cr).view(-1, K).amax(1)                            # (N,)
        rows = video_chunk * K
        self.weights = [np.ascontiguousarray(cq[i:i + rows].T) for i in range(0, len(cq), rows)]  # (H, rows)
        self.sessions = [_matmul_integer(w, cs[i * rows:(i + 1) * rows], threads)     # pre-packed: read once
                         for i, w in enumerate(self.weights)]
        aq, a_scale, a_resid, self.a_norm = _quantize_rows(attended)
        self.a_u8 = torch.from_numpy(aq.view(np.uint8) ^ np.uint8(0x80))          # q + 128 (N*K, H)
        self.a_table = torch.from_numpy(np.stack([a_scale, a_resid], 1))           # (N*K, 2) per row
        self.a_round = _INT8_ROUNDING * max(1.0, self.a_norm)
        self.rows_session = _matmul_integer(None, None, threads)

    def prepare(self, q: torch.Tensor) -> dict:
        x = q.numpy().astype(np.float64)                                                  # (Q, H)
        if not np.isfinite(x).all():
            raise ValueError("a query vector holds a value that is not finite (NaN or inf)")
        s1 = _row_scale(x)
        q1 = np.clip(np.rint(x / s1), -127, 127)
        r = x - s1 * q1
        s2 = _row_scale(r)
        q2 = np.clip(np.rint(r / s2), -127, 127)
        d = np.linalg.norm(r - s2 * q2, axis=1) * 1.001                                   # ||d||
        qn = np.linalg.norm(s1 * q1 + s2 * q2, axis=1) * 1.001                            # ||q~||
        Q = len(x)
        rows = np.stack([q1, q2], 1).reshape(2 * Q, self.H)                               # (2Q, H)
        return {"Q": Q, "a": (rows + 128).astype(np.uint8), "b": np.ascontiguousarray(rows.T.astype(np.int8)),
                "s": np.concatenate([s1, s2], 1).astype(np.float32), "qn": torch.from_numpy(qn).float(),
                "d": torch.from_numpy(d).float()}

    def clips(self, state: dict, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        K, Q = self.K, state["Q"]
        session = self.sessions[start // self.video_chunk]
        s = torch.from_numpy(session.run(None, {"A": state["a"], "s": state["s"]})[0])     # (Q, n*K)
        err = (state["qn"][:, None] * self.c_resid[start:end]
               + (state["d"] * self.c_norm + _INT8_ROUNDING * max(1.0, self.c_norm))[:, None])   # (Q, n)
        return s.view(Q, end - start, K), err

    def frame_ub(self, state: dict, near: torch.Tensor, start: int) -> torch.Tensor:
        """Few queries: only the near clips' attended rows (a few per video), each row once for
        all of them. Many: every row of the chunk in one product (the rows are read once)."""
        Q, n, K = near.shape
        if Q > self.gather_queries:
            rows = torch.arange(start * K, (start + n) * K)
            y = self._rows_product(state, rows, contiguous=True).T                       # (Q, n*K)
            ub = y * self.a_table[rows, 0] + self._row_err(state, rows)
            return torch.where(near, ub.view(Q, n, K), float("-inf")).amax(-1)
        qi, vi, rows = _near_rows(near, start)
        if Q == 1:                                                   # rows are distinct already
            y = self._rows_product(state, rows)[:, 0]
        else:
            uniq, where = torch.unique(rows, return_inverse=True)
            y = self._rows_product(state, uniq)[where, qi]                                # (R,)
        err = self._row_err(state, rows, qi)
        return _video_max(torch.addcmul(err, y, self.a_table[rows, 0]), qi, vi, Q, n)

    def _rows_product(self, state: dict, rows: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
        """(s1 q1 + s2 q2) . q_r of the attended rows, before their scale: (R, Q) fp32."""
        a = self.a_u8[rows[0]:rows[-1] + 1] if contiguous else self.a_u8.index_select(0, rows)
        return torch.from_numpy(self.rows_session.run(None, {"A": a.numpy(), "B": state["b"], "s": state["s"]})[0])

    def _row_err(self, state: dict, rows: torch.Tensor, qi: torch.Tensor | None = None) -> torch.Tensor:
        """The bound of each attended row's screened score: (R,) for the queries qi, else (Q, R)."""
        resid = self.a_table[rows, 1]
        if qi is None:
            return state["qn"][:, None] * resid + (state["d"] * self.a_norm + self.a_round)[:, None]
        return state["qn"][qi] * resid + (state["d"][qi] * self.a_norm + self.a_round)
