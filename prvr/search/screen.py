"""Low-precision screens for the exact engine: every clip score of a query, cheaply, each
within a rigorous error bound, so that `ExactSearch` can certify its top-k.

A screen answers two questions for the queries of one call:

* ``clips(state, start, end)``: screened clip scores (Q, n, K) of videos start..end, their
  max per video (Q, n) and a bound ``err`` (broadcastable to (Q, n)) with
  |screened - exact fp32 cosine| <= err;
* ``frame_ub(state, near, start)``: an upper bound (Q, n) on each video's exact frame score
  over its clips marked in ``near`` (the clips that may be its key clip).

`Bf16Screen` keeps a bfloat16 copy of both arrays (2 bytes per value) and uses native bf16
products; `Int8Screen` keeps int8 copies (1 byte per value, a scale and a residual norm per
row; the clips once more in ONNX Runtime's pre-packed form) and exact integer products
(MatMulInteger): half the memory traffic of bf16 on the memory-bound single-query screen.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from prvr.model import fuse

__all__ = ["Bf16Screen", "Int8Screen", "FusedScreen", "BF16_OUT_REL", "FOLD_MAX_H", "bf16_supported"]

# Error of a bf16 product q~.c~ against the fp32 q.c (Cauchy-Schwarz, no cancellation assumed):
#   |q~.c~ - q.c| <= ||q~ - q|| ||c~|| + ||q|| ||c~ - c||  (input rounding, measured exactly)
#                  + 2^-8 |x| (bf16 output rounding: 8 significant bits) + H 2^-24 (fp32 accumulation).
BF16_OUT_REL = 2.0 ** -8 * 1.01       # (fp32 accumulation and one rounding: checked at init)
# Rounding of the fp32 arithmetic that turns exact int32 products into scores: a few ulps of
# values of magnitude about ||q~|| max(1, largest row norm) (a shared int8 scale can make a
# stored row's norm exceed its vector's by a fraction); this is far above its true size.
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


_SILENCED = []


def _view(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing a (read-only, memory-mapped) array's memory and dtype; only read.

    torch warns once per process that such memory is not writable; that first call runs with
    the warning silenced, the later ones plainly: entering `warnings.catch_warnings()` on
    every request would reset Python's record of the warnings already shown, and another
    library's once-only warning (a web framework's) would then repeat on every request."""
    a = np.asarray(arr)
    if a.flags.writeable or _SILENCED:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(a)
    _SILENCED.append(True)
    return view


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

    def clips(self, state: dict, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        K = self.K
        s = self.products(state["qb"], start * K, end * K).view(len(state["qb"]), end - start, K)
        smax = s.amax(-1)
        # output rounding matters only near each video's max: |x| <= max|smax| + window
        big = smax.abs().amax(1, keepdim=True) + 2 * (state["e_c"] + 2 * BF16_OUT_REL)          # (Q, 1)
        return s, smax, state["e_c"] + BF16_OUT_REL * big

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
# ONNX Runtime multiplies uint8 A by int8 B. On x86 CPUs without VNNI its kernel adds the
# products of adjacent pairs in int16 and saturates above 32767 (vpmaddubsw), so the values
# are kept where no pair can: stored rows use all of int8 (|q| <= 127); a query uses 7 bits
# (|q| <= 63), as A offset by 64 (<= 127: 2 * 127 * 127 < 32768) or as B against rows
# offset by 128 (<= 255: 2 * 255 * 63 < 32768). `_check_exact_products` tests the kernels.
ROW_MAX, QUERY_MAX = 127, 63
ROW_ZERO, QUERY_ZERO = 128, 64
FOLD = 2 * QUERY_MAX                   # see _prepare_queries
FOLD_MAX_H = (2 ** 31 - 1) // (ROW_MAX * QUERY_MAX * (FOLD + 1))   # |FOLD y1 + y2| in int32: H <= 2,113


def _quantize(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per row: x ~ s q with |q| <= top; s (R, 1) is rounded to the fp32 value ONNX
    Runtime multiplies by, so that s q is exactly the vector whose products it computes."""
    s = (np.abs(x).max(1, keepdims=True) / top).astype(np.float32)
    s[s == 0] = 1.0                                                    # an all-zero row: q = 0
    s = s.astype(np.float64)
    return np.clip(np.rint(x / s), -top, top), s


def _quantize_rows(arr: np.ndarray, rows: int = 1 << 13, mix: tuple[np.ndarray, float] | None = None,
                   group: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Stored rows: q (R, H) int8, scale (R,) fp32, the residual norm ||x - scale q|| per row
    (rounded up) and max ||x|| (in float64). With mix = (other, alpha) the rows are
    fuse(arr, other, alpha), formed in float64. Each `group` rows in a row share one scale
    (the largest value among them sets it)."""
    R, H = arr.shape
    q, scale, resid = np.empty((R, H), np.int8), np.empty(R, np.float32), np.empty(R, np.float32)
    if R % group:
        raise ValueError(f"{R} rows do not make groups of {group}")
    norm, rows = 0.0, max(group, rows - rows % group)
    for i in range(0, R, rows):
        x = np.asarray(arr[i:i + rows], np.float64)
        if mix is not None:
            x = fuse(x, np.asarray(mix[0][i:i + rows], np.float64), mix[1])
        if not np.isfinite(x).all():
            raise ValueError(f"rows {i}..{i + len(x) - 1} hold a value that is not finite (NaN or inf): "
                             "an index to screen must be finite")
        qi, s = _quantize(x.reshape(-1, group * H), ROW_MAX)                  # one scale per group
        qi, s = qi.reshape(-1, H), np.repeat(s, group, 0)                       # (rows, H), (rows, 1)
        q[i:i + rows], scale[i:i + rows] = qi, s[:, 0]
        resid[i:i + rows] = np.linalg.norm(x - s * qi, axis=1) * 1.001
        norm = max(norm, float(np.linalg.norm(x, axis=1).max()))
    return q, scale, resid, norm * 1.001


def _external(name: str, arr: np.ndarray, opts: ort.SessionOptions) -> TensorProto:
    """A graph initializer whose data ONNX Runtime reads from `arr` itself, not from a copy in
    the serialized model (which would cost several times the array in RAM). The caller keeps
    `arr` alive as long as the session."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape,
                    data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=f"{name}.bin")       # never read: supplied below
    opts.add_external_initializers([name], [ort.OrtValue.ortvalue_from_numpy(arr)])
    return t


def _session(nodes: list, inputs: list, inits: list, opts: ort.SessionOptions,
             out_type: int = TensorProto.FLOAT) -> ort.InferenceSession:
    out = helper.make_tensor_value_info("S", out_type, [None, None])
    model = helper.make_model(helper.make_graph(nodes, "screen", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # no busy cores after a call
    return opts


def _weights_session(weights: np.ndarray, scale: np.ndarray | None, threads: int) -> ort.InferenceSession:
    """Queries against stored rows pre-packed once (`weights` (H, R) int8, kept alive by the
    caller): (A uint8 (2Q, H) = query pairs + 64, s (Q, 2)) -> (s1 y1 + s2 y2) * scale (Q, R),
    with y = (A - 64) @ weights in exact int32; with scale None, A -> y (2Q, R) itself."""
    opts = _options(threads)
    inits = [helper.make_tensor("zero", TensorProto.UINT8, [], [QUERY_ZERO]), _external("B", weights, opts)]
    a = helper.make_tensor_value_info("A", TensorProto.UINT8, [None, weights.shape[0]])
    if scale is None:
        return _session([helper.make_node("MatMulInteger", ["A", "B", "zero"], ["S"])], [a], inits, opts,
                        TensorProto.INT32)
    inits += [numpy_helper.from_array(scale, "scale"),
             helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 2, weights.shape[1]]),
             helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
             helper.make_tensor("last", TensorProto.INT64, [1], [2])]
    nodes = [helper.make_node("MatMulInteger", ["A", "B", "zero"], ["Y"]),
             helper.make_node("Cast", ["Y"], ["Yf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["Yf", "shape"], ["Y3"]),                     # (Q, 2, R)
             helper.make_node("Unsqueeze", ["s", "last"], ["s3"]), helper.make_node("Mul", ["Y3", "s3"], ["P"]),
             helper.make_node("ReduceSum", ["P", "axis"], ["PS"], keepdims=0),
             helper.make_node("Mul", ["PS", "scale"], ["S"])]
    return _session(nodes, [a, helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, 2])], inits, opts)


def _rows_session(threads: int) -> ort.InferenceSession:
    """Given rows against the queries: (A uint8 (R, H) = rows + 128, B int8 (H, 2Q) = query
    pairs as columns, s (Q, 2)) -> s1 y1 + s2 y2 (R, Q), with y = (A - 128) @ B in exact int32."""
    inits = [helper.make_tensor("zero", TensorProto.UINT8, [], [ROW_ZERO]),
             helper.make_tensor("shape", TensorProto.INT64, [3], [0, -1, 2]),
             helper.make_tensor("axis", TensorProto.INT64, [1], [2])]
    nodes = [helper.make_node("MatMulInteger", ["A", "B", "zero"], ["Y"]),
             helper.make_node("Cast", ["Y"], ["Yf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["Yf", "shape"], ["Y3"]), helper.make_node("Mul", ["Y3", "s"], ["P"]),
             helper.make_node("ReduceSum", ["P", "axis"], ["S"], keepdims=0)]
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, None]),
              helper.make_tensor_value_info("B", TensorProto.INT8, [None, None]),
              helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, 2])]
    return _session(nodes, inputs, inits, _options(threads))


@functools.lru_cache(maxsize=None)
def _check_exact_products(threads: int, H: int = 256) -> None:
    """Both kinds of session on the largest values they are given, against int64 products:
    a CPU whose integer kernels round or saturate them would break the bound (once a process)."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.full((4, H), ROW_MAX), np.full((4, H), -ROW_MAX),
                           rng.integers(-ROW_MAX, ROW_MAX + 1, (56, H))]).astype(np.int8)       # (64, H)
    pairs = np.concatenate([np.full((2, H), QUERY_MAX), np.full((2, H), -QUERY_MAX),
                            rng.integers(-QUERY_MAX, QUERY_MAX + 1, (4, H))])                    # (2Q, H), Q=4
    y = pairs.astype(np.int64) @ rows.T.astype(np.int64)                                       # (2Q, 64)
    want = (y[0::2] + y[1::2]).astype(np.float32)                                              # (Q, 64): exact
    s = np.ones((4, 2), np.float32)                                      # y1 + y2 of each pair
    weights = np.ascontiguousarray(rows.T)
    got_w = _weights_session(weights, np.ones(len(rows), np.float32), threads).run(
        None, {"A": (pairs + QUERY_ZERO).astype(np.uint8), "s": s})[0]
    got_r = _rows_session(threads).run(None, {"A": (rows.astype(np.int16) + ROW_ZERO).astype(np.uint8),
                                             "B": np.ascontiguousarray(pairs.T.astype(np.int8)), "s": s})[0]
    got_y = _weights_session(weights, None, threads).run(None, {"A": (pairs + QUERY_ZERO).astype(np.uint8)})[0]
    if not (np.array_equal(got_w, want) and np.array_equal(got_r, want.T) and np.array_equal(got_y, y)):
        raise RuntimeError("ONNX Runtime's integer products are not exact on this CPU, so the int8 "
                           "screen's bound would not hold: set search.screen to bf16 or fp32")


def _prepare_queries(q: torch.Tensor, fold: int | None = None) -> dict:
    """Each query as two 7-bit rows, q = s1 q1 + s2 q2 + d, for one pass over stored rows. With
    `fold`, s1 = fold s2, so that the pass's two exact int32 products y1, y2 make one exact
    integer, fold y1 + y2 (times s2); |q2| <= fold / 2 before clipping."""
    x = q.numpy().astype(np.float64)                                                      # (Q, H)
    if not np.isfinite(x).all():
        raise ValueError("a query vector holds a value that is not finite (NaN or inf)")
    q1, s1 = _quantize(x, QUERY_MAX)
    if fold is None:
        q2, s2 = _quantize(x - s1 * q1, QUERY_MAX)
    else:
        s2 = s1 / fold
        s1 = s2 * fold
        q2 = np.clip(np.rint((x - s1 * q1) / s2), -QUERY_MAX, QUERY_MAX)
    d = np.linalg.norm(x - s1 * q1 - s2 * q2, axis=1) * 1.001                             # ||d||
    qn = np.linalg.norm(s1 * q1 + s2 * q2, axis=1) * 1.001                                # ||q~||
    pairs = np.stack([q1, q2], 1).reshape(2 * len(x), x.shape[1])                         # (2Q, H)
    state = {"Q": len(x), "a": (pairs + QUERY_ZERO).astype(np.uint8), "qn": torch.from_numpy(qn).float(),
             "d": torch.from_numpy(d).float()}
    if fold is not None:
        return {**state, "unit": s2}                                                       # (Q, 1) float64
    return {**state, "b": np.ascontiguousarray(pairs.T.astype(np.int8)),
            "s": np.concatenate([s1, s2], 1).astype(np.float32)}


def _int8_err(state: dict, resid: torch.Tensor, norm: float, qi: torch.Tensor | None = None) -> torch.Tensor:
    """The bound on screened scores of rows with residual norms `resid`: (Q, R) for every
    query, or (R,) for row i and query qi[i]. The rounding term scales with |score|."""
    if qi is None:
        qn, d = state["qn"][:, None], state["d"][:, None]
    else:
        qn, d = state["qn"][qi], state["d"][qi]
    return qn * resid + d * norm + _INT8_ROUNDING * qn * max(1.0, norm)


def _packed_sessions(q: np.ndarray, scale: np.ndarray | None, rows: int, threads: int
                     ) -> tuple[list[np.ndarray], list[ort.InferenceSession]]:
    """One pre-packed session per `rows` stored rows (int8 q (R, H), scale (R,) or None: see
    `_weights_session`); the transposed int8 copies they read must stay alive with them."""
    weights = [np.ascontiguousarray(q[i:i + rows].T) for i in range(0, len(q), rows)]     # (H, rows)
    return weights, [_weights_session(w, None if scale is None else scale[i * rows:(i + 1) * rows], threads)
                     for i, w in enumerate(weights)]


class Int8Screen:
    """int8 copies of both arrays (x ~ s_r q_r per row) and exact integer products.

    The query is split in two 7-bit rows, q = s1 q1 + s2 q2 + d (the second quantizes the
    first's remainder, so ||d|| ~ 1e-4 ||q||), both scored in one pass over the stored rows:
        |q.x - (s1 q1 + s2 q2).s_r q_r| <= ||q~|| ||x - s_r q_r|| + ||d|| ||x|| + rounding.
    The clip side uses each video's largest residual norm, the frame side each row's.

    ONNX Runtime gives each session its own thread pool: threads - 1 extra threads per
    `video_chunk` videos (one session each) and threads - 1 for the gathered rows (the
    fused screen: threads - 1 more per `video_chunk` videos)."""

    def __init__(self, clips: np.ndarray, attended: np.ndarray, K: int, video_chunk: int,
                 threads: int | None = None, gather_queries: int = 4):
        self.K, self.H, self.video_chunk, self.gather_queries = K, clips.shape[1], video_chunk, gather_queries
        threads = threads or torch.get_num_threads()
        _check_exact_products(threads)
        cq, cs, cr, self.c_norm = _quantize_rows(clips)
        self.c_resid = torch.from_numpy(cr).view(-1, K).amax(1)                            # (N,)
        self.weights, self.sessions = _packed_sessions(cq, cs, video_chunk * K, threads)
        aq, a_scale, a_resid, self.a_norm = _quantize_rows(attended)
        self.a_u8 = torch.from_numpy(aq.view(np.uint8) ^ np.uint8(0x80))          # q + 128 (N*K, H)
        self.a_table = torch.from_numpy(np.stack([a_scale, a_resid], 1))           # (N*K, 2) per row
        self.rows_session = _rows_session(threads)

    def prepare(self, q: torch.Tensor) -> dict:
        return _prepare_queries(q)

    def clips(self, state: dict, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.sessions[start // self.video_chunk].run(None, {"A": state["a"], "s": state["s"]})[0]
        s = torch.from_numpy(out).view(state["Q"], end - start, self.K)
        return s, s.amax(-1), _int8_err(state, self.c_resid[start:end], self.c_norm)          # err (Q, n)

    def frame_ub(self, state: dict, near: torch.Tensor, start: int) -> torch.Tensor:
        """Few queries: only the near clips' attended rows (a few per video), each row once for
        all of them. Many: every row of the chunk in one product (the rows are read once)."""
        Q, n, K = near.shape
        if Q > self.gather_queries:
            rows = torch.arange(start * K, (start + n) * K)
            y = self._rows_product(state, rows, contiguous=True).T                       # (Q, n*K)
            ub = y * self.a_table[rows, 0] + _int8_err(state, self.a_table[rows, 1], self.a_norm)
            return torch.where(near, ub.view(Q, n, K), float("-inf")).amax(-1)
        qi, vi, rows = _near_rows(near, start)
        if Q == 1:                                                   # rows are distinct already
            y = self._rows_product(state, rows)[:, 0]
        else:
            uniq, where = torch.unique(rows, return_inverse=True)
            y = self._rows_product(state, uniq)[where, qi]                                # (R,)
        table = self.a_table[rows]                                                        # (R, 2)
        err = _int8_err(state, table[:, 1], self.a_norm, qi)
        return _video_max(torch.addcmul(err, y, table[:, 0]), qi, vi, Q, n)

    def _rows_product(self, state: dict, rows: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
        """(s1 q1 + s2 q2) . q_r of the attended rows, before their scale: (R, Q) fp32."""
        a = self.a_u8[rows[0]:rows[-1] + 1] if contiguous else self.a_u8.index_select(0, rows)
        return torch.from_numpy(self.rows_session.run(None, {"A": a.numpy(), "B": state["b"], "s": state["s"]})[0])


class FusedScreen:
    """int8 copy of the fused clip vectors z = alpha c + (1 - alpha) a at one alpha (the index's).

    A video's fused score is q.z at its key clip, so its largest screened q.z plus the int8
    bound is an upper bound of it: one pass over the z rows bounds every video, without
    the clip screen's second step (the frame products at the clips that may be the key
    clip). The bound is tight where few videos own a clip pointing at the query; where it is
    not, the caller's certificate fails and it takes the two-step screen. 2 bytes per value
    (the int8 rows and ONNX Runtime's pre-packed copy).

    The K rows of a video share one scale and the query's two 7-bit rows fold into one
    integer (`_prepare_queries` with FOLD), so a video's largest screened q.z is its largest
    exact int32 product times two scales: the pass returns the products and nothing else."""

    def __init__(self, clips: np.ndarray, attended: np.ndarray, alpha: float, K: int, video_chunk: int,
                 threads: int | None = None):
        self.alpha, self.K, self.video_chunk = float(alpha), K, video_chunk
        if clips.shape[1] > FOLD_MAX_H:
            raise ValueError(f"the fused screen's integer products hold vectors of up to {FOLD_MAX_H} "
                             f"values, not {clips.shape[1]}")
        threads = threads or torch.get_num_threads()
        _check_exact_products(threads)
        zq, zs, zr, self.norm = _quantize_rows(clips, mix=(attended, self.alpha), group=K)
        self.scale = zs[::K].astype(np.float64)                                             # (N,)
        self.resid = torch.from_numpy(zr).view(-1, K).amax(1)                               # (N,)
        self.weights, self.sessions = _packed_sessions(zq, None, video_chunk * K, threads)

    def prepare(self, q: torch.Tensor) -> dict:
        return _prepare_queries(q, FOLD)

    def bounds(self, state: dict, start: int, end: int) -> torch.Tensor:
        """Upper bounds (Q, n) on the exact fused scores of videos start..end."""
        y = self.sessions[start // self.video_chunk].run(None, {"A": state["a"]})[0]         # (2Q, n*K) int32
        best = (y[0::2] * FOLD + y[1::2]).reshape(state["Q"], end - start, self.K).max(-1)  # (Q, n) exact
        screened = torch.from_numpy(best * state["unit"] * self.scale[start:end])           # float64
        return (screened + _int8_err(state, self.resid[start:end], self.norm)).float()
