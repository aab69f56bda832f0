"""MS-SL++ for Partially Relevant Video Retrieval, top-down in one file.

Small modules first (feature encoder, query pooling, clustering), the full
network last. Shapes: Q queries, L tokens, V videos, U clip units (map_size),
N spans, K kept clips, T frames, H hidden size.

Encode and score are separate, so videos are encoded once and scored against any
query later. `score` is the fp32 reference (evaluation uses it; the search engines'
faster paths are tested against it). Training scores a batch with `training_scores`: the
same clip and frame scores in differentiable form (its losses use each scale on its own).
Every path that combines the two scales does it through `fuse`::

    q = model.encode_queries(tokens, token_mask)              # (Q, H)
    v = model.encode_videos(units, frames, frame_mask)        # clips/attended (V, K, H)
    s = score(q, v.clips, v.attended, alpha)                   # fused/clip/frame (Q, V)
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prvr.config import ModelConfig

__all__ = ["PRVRModel", "VideoEmbeddings", "Scores", "score", "training_scores", "fuse", "kmedoids",
           "span_table", "sinusoidal_table", "kept_rows"]


class VideoEmbeddings(NamedTuple):
    """What a video contributes to retrieval, independent of any query."""
    clips: torch.Tensor     # (V, K, H) clip embeddings (medoid spans for ms-sl++)
    spans: torch.Tensor     # (V, K, 2) int64 [start, end) in clip units
    attended: torch.Tensor  # (V, K, H) KCGA frame vector when clip k is the key clip


class Scores(NamedTuple):
    fused: torch.Tensor     # (Q, V) fuse(clip, frame, alpha)
    clip: torch.Tensor      # (Q, V) max cosine over the video's clips
    frame: torch.Tensor     # (Q, V) cosine with the key clip's attended frame vector
    key_clip: torch.Tensor  # (Q, V) int64 index of the key clip in 0..K-1


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #
def kept_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Flat indices (n,) of the unmasked positions of a (B, L) mask; None when none is masked."""
    return None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) -> the kept positions (n, D), or all B * L of them."""
    x = x.reshape(-1, x.shape[-1])
    return x if rows is None else x.index_select(0, rows)


def _put(x: torch.Tensor, rows: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
    """(n, D) rows back at their positions (B, L, D); zeros at the masked ones."""
    if rows is None:
        return x.view(B, L, -1)
    return x.new_zeros(B * L, x.shape[-1]).index_copy(0, rows, x).view(B, L, -1)


def _dropout(x: torch.Tensor, drop: nn.Dropout, shape: tuple[int, ...],
             rows: torch.Tensor | None) -> torch.Tensor:
    """drop(x) for the kept rows (n, D) of a padded (B, L, D) batch.

    The mask is drawn over the whole padded shape, so skipping the padding changes neither
    the random stream nor any later dropout mask. On the CPU it is exactly what nn.Dropout
    draws and applies (bernoulli_(1 - p), then / (1 - p)): the same bits."""
    if not drop.training or drop.p == 0:
        return x
    keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - drop.p)
    return x * _take(keep, rows).div_(1 - drop.p)


class SelfAttentionBlock(nn.Module):
    """Multi-head self-attention + output projection + residual + LayerNorm (no FFN)."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, hidden)
        self.out_drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """x (n, H): the kept rows of a (B, L) batch (`rows`, see kept_rows) -> (n, H)."""
        (B, L), H = mask.shape, x.shape[-1]
        qkv = _put(self.qkv(x), rows, B, L)                                # (B, L, 3H)
        q, k, v = qkv.view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2) / math.sqrt(H // self.heads)       # (B, h, L, L)
        att = att.masked_fill(~mask[:, None, None, :], torch.finfo(att.dtype).min)
        att = self.attn_drop(att.softmax(-1))
        y = _take((att @ v).transpose(1, 2).reshape(B, L, H), rows)       # (n, H)
        return self.norm(x + _dropout(self.out(y), self.out_drop, (B, L, H), rows))


class FeatureEncoder(nn.Module):
    """Input projection, trainable positions, one self-attention block (query/clip/frame).

    Position-wise layers run on the unmasked positions only: padding is about half of a
    batch of frames or tokens. Their outputs equal a padded forward's (dropout included,
    see _dropout); masked positions come out as zeros."""

    def __init__(self, in_dim: int, hidden: int, max_len: int, heads: int, dropout: float):
        super().__init__()
        self.project = nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout),
                                     nn.Linear(in_dim, hidden), nn.ReLU())
        self.position = nn.Embedding(max_len, hidden)
        self.pos_norm = nn.LayerNorm(hidden)
        self.pos_drop = nn.Dropout(dropout)
        self.attention = SelfAttentionBlock(hidden, heads, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) with mask (B, L) -> (B, L, H)."""
        (B, L, D), rows = x.shape, kept_rows(mask)
        norm, drop, linear, relu = self.project
        h = relu(linear(_dropout(norm(_take(x, rows)), drop, (B, L, D), rows)))  # (n, H)
        positions = torch.arange(L, device=x.device).repeat(B)            # (B * L,)
        h = self.pos_norm(h + self.position(positions if rows is None else positions[rows]))
        h = _dropout(h, self.pos_drop, (B, L, h.shape[-1]), rows)
        return _put(self.attention(h, mask, rows), rows, B, L)            # (B, L, H)


def masked_softmax_pool(x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted sum of x (B, L, H) with softmax(logits (B, L)) over unmasked positions."""
    w = logits.masked_fill(~mask, torch.finfo(logits.dtype).min).softmax(-1)
    return (w.unsqueeze(-1) * x).sum(1)                                  # (B, H)


def span_table(units: int) -> torch.Tensor:
    """All contiguous spans of `units` clip units, ordered by length then start: (N, 2) [start, end)."""
    spans = [(s, s + n) for n in range(1, units + 1) for s in range(units - n + 1)]
    return torch.tensor(spans, dtype=torch.long)


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal encoding (n, dim); row i encodes span length i + 1."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


# --------------------------------------------------------------------------- #
# Length-aware clip clustering (batched k-medoids, no [B, K, N, N] tensors)
# --------------------------------------------------------------------------- #
def _shifted(dist: torch.Tensor) -> torch.Tensor:
    """The original's distance setup, per video: d - max(d) - 1, and 1 less on the diagonal.

    All values are then below the 0 a non-member adds to a medoid sum, and every point is
    nearest to itself (it joins its own cluster and is never seeded twice). Working on the
    same numbers as the original matters: exact ties are common among spans (a two-span
    cluster; a span halfway between two medoid spans) and rounding decides them."""
    d = (dist - dist.amax(dim=(1, 2), keepdim=True)).sub_(1)             # (B, N, N)
    d.diagonal(dim1=1, dim2=2).sub_(1)
    return d


def _kkz_init(d: torch.Tensor, norms: torch.Tensor, k: int) -> torch.Tensor:
    """KKZ seeding (B, k) on shifted distances: the point of largest norm, then each time the
    point farthest from the medoids chosen so far; ties go to the lowest index."""
    B = d.shape[0]
    batch = torch.arange(B, device=d.device)
    medoids = torch.empty(B, k, dtype=torch.long, device=d.device)
    medoids[:, 0] = norms.argmax(-1)
    nearest = d[batch, medoids[:, 0]]                                     # (B, N)
    for j in range(1, k):
        medoids[:, j] = nearest.argmax(-1)
        nearest = torch.minimum(nearest, d[batch, medoids[:, j]])
    return medoids


def _nearest_medoid(rows: torch.Tensor) -> torch.Tensor:
    """rows (A, k, N) medoid -> point distances -> each point's medoid slot (A, N), the first
    on ties (argmin's rule): k passes over (A, N), cheaper than a strided argmin over k."""
    best = rows[:, 0].clone()
    slot = torch.zeros(best.shape, dtype=torch.long, device=rows.device)
    for j in range(1, rows.shape[1]):
        closer = rows[:, j] < best
        best = torch.where(closer, rows[:, j], best)
        slot.masked_fill_(closer, j)
    return slot


def _own_cluster_costs(flat: torch.Tensor, points: torch.Tensor, members: torch.Tensor,
                       clusters: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Summed shifted distance from each of `points` to its own cluster (M,).

    Each sum runs over the point's whole distance row with zeros at non-members, as the
    original's masked (B, k, N, N) sum does: the same numbers in the same order, so the same
    rounding. flat (B*N, N): distance rows, `points` indexes them; members (R, N): one
    membership row per (video, cluster), `clusters` (M,) picks each point's."""
    out = [flat.new_zeros(0)]
    for start in range(0, len(points), chunk):                          # bounded temporaries
        same = members.index_select(0, clusters[start:start + chunk])    # (m, N)
        rows = flat.index_select(0, points[start:start + chunk])          # (m, N)
        out.append(torch.where(same, rows, 0.0).sum(-1))
    return torch.cat(out)


class _Clusters:
    """A batched k-medoids run's assignments and each point's summed distance to its own
    cluster. A cluster whose members all stayed keeps its sums (same rows, same mask, same
    bits), so an update recomputes only the rows of the clusters that gained or lost a point."""

    def __init__(self, d: torch.Tensor):
        B, N, _ = d.shape
        self.flat, self.N = d.view(B * N, N), N                           # (B*N, N)
        self.assign = torch.full((B, N), -1, dtype=torch.long, device=d.device)
        self.cost = torch.zeros(B, N, dtype=d.dtype, device=d.device)

    def update(self, active: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
        """One assignment + medoid update of the `active` videos' medoids (A, k) -> (A, k):
        each cluster's member with the least summed distance to it, the lowest index on ties."""
        (A, k), N, dev = medoids.shape, self.N, medoids.device
        rows = self.flat.index_select(0, (active[:, None] * N + medoids).view(-1))
        assign = _nearest_medoid(rows.view(A, k, N))                      # (A, N)
        prev = self.assign[active]
        self.assign[active] = assign
        moved = assign != prev                                            # (A, N); all, at first
        left = moved & (prev >= 0)
        video = torch.arange(A, device=dev)[:, None].expand(A, N)
        changed = torch.zeros(A, k, dtype=torch.bool, device=dev)          # gained or lost a point
        changed[video[moved], assign[moved]] = True
        changed[video[left], prev[left]] = True
        v, i = changed.gather(1, assign).nonzero(as_tuple=True)           # the rows to recompute
        member = assign[:, :, None] == torch.arange(k, device=dev)        # (A, N, k)
        members = member.transpose(1, 2).reshape(A * k, N)                # (A*k, N)
        cost = self.cost[active]                                          # (A, N)
        cost[v, i] = _own_cluster_costs(self.flat, active[v] * N + i, members, v * k + assign[v, i])
        self.cost[active] = cost
        return cost[:, :, None].masked_fill(~member, float("inf")).argmin(1)  # (A, k)


@torch.no_grad()
def kmedoids(dist: torch.Tensor, norms: torch.Tensor, k: int, iters: int = 60,
             tol: float = 1e-5) -> torch.Tensor:
    """Batched k-medoids choosing the medoids of the original MS-SL++ clustering -> sorted (B, k).

    dist (B, N, N): Euclidean distances between the points; norms (B, N): their L2 norms.
    KKZ initialisation, then assignment / medoid update until the medoids' summed shift
    (distance from each old medoid to its new one) is below `tol`, or `iters` updates;
    ties as the original's argmin / argmax. Given the same distances, the medoids equal the
    original's run one video at a time. The original stops a group of up to 64 videos
    together on their mean shift (and shifts distances by the group's maximum); here each
    video stops on its own, so its medoids never depend on the videos batched with it. A
    video that reached a fixed point stays there, so the two stop rules differ only when a
    medoid moves by less than 64 * tol (docs/architecture.md). No (B, k, N, N) tensor: the
    cost sums are (B, N, N) at most, and after the first update only changed clusters'.
    """
    B, N, _ = dist.shape
    if not 0 < k <= N:
        raise ValueError(f"k-medoids needs 0 < k <= the number of points ({N}), got k={k}")
    if norms.shape != dist.shape[:2]:
        raise ValueError(f"norms must have shape {tuple(dist.shape[:2])}, got {tuple(norms.shape)}")
    shifted = _shifted(dist)
    medoids = _kkz_init(shifted, norms, k)
    state = _Clusters(shifted)
    active = torch.arange(B, device=dist.device)
    for _ in range(iters):
        if len(active) == 0:
            break
        old = medoids[active]
        new = state.update(active, old)
        # how far each medoid moved; an unchanged one moved by exactly 0 (not by d[m, m])
        shift = (dist[active[:, None], new, old] * (new != old)).sum(-1)  # (A,)
        medoids[active] = new
        active = active[shift >= tol]
    return medoids.sort(-1).values


# --------------------------------------------------------------------------- #
# Scoring (shared by training, evaluation, search and serving)
# --------------------------------------------------------------------------- #
def fuse(clip: Any, frame: Any, alpha: float) -> Any:
    """The fused score S: S_clip weighted by alpha plus S_frame weighted by 1 - alpha.

    Works on tensors, arrays and floats alike, and is linear, so it also fuses vectors
    (the faiss index holds fuse(clip, attended) per clip) and upper bounds."""
    return alpha * clip + (1 - alpha) * frame


def score(queries: torch.Tensor, clips: torch.Tensor, attended: torch.Tensor,
          alpha: float, video_chunk: int = 4096, unit: bool = False) -> Scores:
    """Fused, clip-scale and frame-scale scores of queries (Q, H) against videos (V, K, H).

    S_c = max over clips of cosine(query, clip); the argmax is the key clip;
    S_f = cosine(query, attended vector of the key clip); S = fuse(S_c, S_f, alpha).
    Videos are processed in chunks so memory stays bounded for large corpora. `unit`: the
    clips and attended vectors are unit vectors already (normalised once by a caller that
    scores many query batches), so the chunks are not normalised again.
    """
    q = F.normalize(queries.float(), dim=-1)                              # (Q, H)
    (V, K, H), Q = clips.shape, len(q)
    # bound each (Q, v, K) block to ~2^26 floats whatever the number of clips K
    video_chunk = max(1, min(video_chunk, (1 << 26) // max(1, Q * K)))
    out = []
    for start in range(0, V, video_chunk):
        c, a = clips[start:start + video_chunk].float(), attended[start:start + video_chunk].float()
        if not unit:
            c, a = F.normalize(c, dim=-1), F.normalize(a, dim=-1)         # (v, K, H)
        v = len(c)
        sims = (q @ c.reshape(v * K, H).T).view(Q, v, K)                  # (Q, v, K)
        clip_score, key = sims.max(-1)                                    # (Q, v)
        frame_all = (q @ a.reshape(v * K, H).T).view(Q, v, K)             # (Q, v, K)
        frame_score = frame_all.gather(2, key.unsqueeze(-1)).squeeze(-1)  # (Q, v)
        out.append((clip_score, frame_score, key))
    clip_score = torch.cat([o[0] for o in out], 1)
    frame_score = torch.cat([o[1] for o in out], 1)
    key = torch.cat([o[2] for o in out], 1)
    return Scores(fuse(clip_score, frame_score, alpha), clip_score, frame_score, key)


def training_scores(queries: torch.Tensor, clips: torch.Tensor,
                    attended: torch.Tensor) -> dict[str, torch.Tensor]:
    """The losses' score matrices (Q, V), differentiable: cosine and raw dot product per scale.

    The same scores as `score` (no chunking: a training batch is small), for PRVRModel.forward
    and for data-parallel training, which scores the embeddings gathered from every rank.
    The frame scale scores every (query, clip) pair with one product and then picks the key
    clip's: cheaper than gathering a (Q, V, H) tensor of attended vectors and its backward."""
    raw_all = torch.einsum("qh,vkh->qvk", queries, clips)                 # (Q, V, K)
    q_norm = queries.norm(dim=-1).clamp_min(1e-12)                        # (Q,)
    clip_norm = clips.norm(dim=-1).clamp_min(1e-12)                       # (V, K)
    clip, key = (raw_all / (q_norm[:, None, None] * clip_norm)).max(-1)   # (Q, V)
    key = key.unsqueeze(-1)                                               # (Q, V, 1)
    frame_all = torch.einsum("qh,vkh->qvk", queries, attended)            # (Q, V, K)
    raw_frame = frame_all.gather(2, key).squeeze(-1)                      # (Q, V)
    att_norm = attended.norm(dim=-1).clamp_min(1e-12)                     # (V, K)
    att_norm = att_norm.expand(len(queries), -1, -1).gather(2, key).squeeze(-1)  # (Q, V)
    frame = raw_frame / (q_norm[:, None] * att_norm)
    return {"clip": clip, "frame": frame, "clip_raw": raw_all.max(-1).values, "frame_raw": raw_frame}


# --------------------------------------------------------------------------- #
# The network
# --------------------------------------------------------------------------- #
class PRVRModel(nn.Module):
    """MS-SL++ (variant 'ms-sl++'), MS-SL ('ms-sl': all spans) or a mean-pool baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.video_dim <= 0 or cfg.text_dim <= 0:
            raise ValueError("ModelConfig.video_dim and text_dim must be read from the data first")
        self.cfg = cfg
        H, drop, heads = cfg.hidden_size, cfg.dropout, cfg.num_heads
        if cfg.variant == "mean-pool":
            self.query_proj = nn.Linear(cfg.text_dim, H)
            self.video_proj = nn.Linear(cfg.video_dim, H)
        else:
            self.query_encoder = FeatureEncoder(cfg.text_dim, H, cfg.max_desc_len, heads, drop)
            self.query_pool = nn.Linear(H, 1, bias=False)
            # As the original code, the clip encoder's position table has max_ctx_len rows
            # (only the first map_size are used); this gives the published parameter counts.
            self.clip_encoder = FeatureEncoder(cfg.video_dim, H, max(cfg.max_ctx_len, cfg.map_size),
                                               heads, drop)
            self.frame_encoder = FeatureEncoder(cfg.video_dim, H, cfg.max_ctx_len, heads, drop)
            self.kcga_key = nn.Linear(H, H, bias=False)
            self.kcga_value = nn.Linear(H, H, bias=False)
            spans = span_table(cfg.map_size)                              # (N, 2)
            pool = torch.zeros(len(spans), cfg.map_size)                  # (N, U) span averaging
            for i, (s, e) in enumerate(spans.tolist()):
                pool[i, s:e] = 1.0 / (e - s)
            self.register_buffer("spans", spans, persistent=False)
            self.register_buffer("span_pool", pool, persistent=False)
            self.register_buffer("length_table", sinusoidal_table(cfg.map_size, cfg.length_enc_dim),
                                 persistent=False)
            self.length_drop = nn.Dropout(drop)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_clips(self) -> int:
        """K: clips kept per video."""
        if self.cfg.variant == "mean-pool":
            return 1
        n = self.cfg.map_size * (self.cfg.map_size + 1) // 2
        return n if self.cfg.variant == "ms-sl" else self.cfg.cluster_num

    # -- queries -------------------------------------------------------------
    def encode_queries(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token features (Q, L, Dt) with mask (Q, L) -> query vectors (Q, H)."""
        tokens = F.normalize(tokens, dim=-1)
        mask = mask.bool()
        if self.cfg.variant == "mean-pool":
            pooled = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            return self.query_proj(pooled)                                # (Q, H)
        h = self.query_encoder(tokens, mask)                              # (Q, L, H)
        return masked_softmax_pool(h, self.query_pool(h).squeeze(-1), mask)  # (Q, H)

    # -- videos --------------------------------------------------------------
    def encode_videos(self, units: torch.Tensor, frames: torch.Tensor,
                      frame_mask: torch.Tensor) -> VideoEmbeddings:
        """Clip units (V, U, Dv), frames (V, T, Dv) + mask -> K clips, spans, attended vectors."""
        frame_mask = frame_mask.bool()
        V = units.shape[0]
        if self.cfg.variant == "mean-pool":
            f = F.normalize(frames, dim=-1) * frame_mask.unsqueeze(-1)
            pooled = f.sum(1) / frame_mask.sum(1, keepdim=True).clamp_min(1)  # (V, Dv)
            vec = self.video_proj(pooled).unsqueeze(1)                      # (V, 1, H)
            spans = torch.tensor([[0, self.cfg.map_size]], device=units.device).expand(V, 1, 2)
            return VideoEmbeddings(vec, spans, vec)
        unit_mask = torch.ones(units.shape[:2], dtype=torch.bool, device=units.device)
        enc_units = self.clip_encoder(units, unit_mask)                   # (V, U, H)
        span_feats = self.span_pool @ enc_units                           # (V, N, H)
        if self.cfg.variant == "ms-sl++":
            keep = self.cluster_spans(enc_units)                          # (V, K)
            clips = span_feats.gather(1, keep.unsqueeze(-1).expand(-1, -1, span_feats.shape[-1]))
            spans = self.spans[keep]                                      # (V, K, 2)
        else:
            clips, spans = span_feats, self.spans.expand(V, -1, -1)
        enc_frames = self.frame_encoder(frames, frame_mask)               # (V, T, H)
        return VideoEmbeddings(clips, spans, self.key_clip_attention(clips, enc_frames, frame_mask))

    @torch.no_grad()
    def cluster_spans(self, enc_units: torch.Tensor) -> torch.Tensor:
        """Medoid span indices (V, K) of [span feature ; length encoding] under Euclidean distance."""
        dist, norms = self.span_distances(enc_units)                      # (V, N, N), (V, N)
        return kmedoids(dist, norms, self.cfg.cluster_num, self.cfg.kmedoids_iters, self.cfg.kmedoids_tol)

    def span_distances(self, enc_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (V, N, N) between the [span feature ; length encoding] of all spans,
        and the L2 norms (V, N) of those vectors (k-medoids seeds at the largest).

        Spans are linear in the units (span = P @ units), so their Gram matrix is
        P (U U^T) P^T: (V, U, U) work instead of (V, N, N, H). The length encoding
        (with dropout in training, drawn per video) enters the same way.
        """
        P = self.span_pool                                                # (N, U)
        gram = P @ (enc_units @ enc_units.transpose(1, 2)) @ P.T          # (V, N, N)
        V = enc_units.shape[0]
        table = self.length_drop(self.length_table.expand(V, -1, -1))     # (V, U, E)
        length = (self.spans[:, 1] - self.spans[:, 0] - 1)                # (N,) length index
        G = table @ table.transpose(1, 2)                                 # (V, U, U)
        # G[:, length][:, :, length] as two row gathers (a gather along the last dim is slow)
        cols = G.transpose(1, 2).index_select(1, length).transpose(1, 2).contiguous()  # (V, U, N)
        by_length = cols.index_select(1, length)                          # (V, N, N)
        gram += by_length                                                 # (V, N, N)
        sq = gram.diagonal(dim1=1, dim2=2)                                # (V, N)
        # sq_i + sq_j into the spent buffer, then - 2 gram in place: the bits of
        # sq_i + sq_j - 2 gram (2 gram is exact) with no further (V, N, N) allocation
        dist = torch.add(sq[:, :, None], sq[:, None, :], out=by_length).sub_(gram, alpha=2)
        return dist.clamp_min_(0).sqrt_(), sq.clamp_min(0).sqrt()

    def key_clip_attention(self, clips: torch.Tensor, frames: torch.Tensor,
                           frame_mask: torch.Tensor) -> torch.Tensor:
        """KCGA for every candidate key clip: clips (V, K, H), frames (V, T, H) -> (V, K, H).

        The raw clip feature is the attention query (single head, no scaling);
        a pair (query, video) only selects which of the K rows it uses. Keys and values
        are projected for the unmasked frames only.
        """
        (V, T, _), rows = frames.shape, kept_rows(frame_mask)
        kept = _take(frames, rows)                                        # (n, H)
        keys = _put(self.kcga_key(kept), rows, V, T)                      # (V, T, H)
        values = _put(self.kcga_value(kept), rows, V, T)                  # (V, T, H)
        logits = clips @ keys.transpose(1, 2)                             # (V, K, T)
        logits = logits.masked_fill(~frame_mask[:, None, :], torch.finfo(logits.dtype).min)
        return logits.softmax(-1) @ values                                # (V, K, H)

    # -- training forward ----------------------------------------------------
    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor, units: torch.Tensor,
                frames: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score matrices (Q, V) for the losses (`training_scores`), the fused score and the
        query vectors (Q, H): encode, then score, on one process's batch."""
        q = self.encode_queries(tokens, token_mask)                       # (Q, H)
        v = self.encode_videos(units, frames, frame_mask)                 # (V, K, H) x2
        out = training_scores(q, v.clips, v.attended)
        return {**out, "fused": fuse(out["clip"], out["frame"], self.cfg.alpha), "queries": q}
