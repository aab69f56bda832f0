"""MS-SL++ model: clustering against a plain reference, the encode/score split, shapes, sizes."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from prvr.config import ModelConfig, default_config
from prvr.model import FeatureEncoder, PRVRModel, kmedoids, score, sinusoidal_table, span_table


def reference_kmedoids(points: torch.Tensor, k: int, iters: int = 60, tol: float = 1e-5) -> list[int]:
    """Obviously-correct k-medoids for one video, as MS-SL++ specifies it: Python loops, explicit
    Euclidean distances, KKZ seeding from the largest norm, ties to the lowest index."""
    n = len(points)
    d = [[float(torch.dist(points[i], points[j])) for j in range(n)] for i in range(n)]
    norms = [float(p.norm()) for p in points]
    medoids = [max(range(n), key=lambda i: (norms[i], -i))]
    while len(medoids) < k:
        nearest = [min(d[i][m] for m in medoids) if i not in medoids else -1.0 for i in range(n)]
        medoids.append(max(range(n), key=lambda i: (nearest[i], -i)))
    for _ in range(iters):
        assign = [medoids.index(i) if i in medoids else min(range(k), key=lambda c: (d[medoids[c]][i], c))
                  for i in range(n)]
        new = [min((i for i in range(n) if assign[i] == c), key=lambda i: (
            sum(d[i][j] for j in range(n) if assign[j] == c), i)) for c in range(k)]
        shift = sum(d[a][b] for a, b in zip(new, medoids))
        medoids = new
        if shift < tol:
            break
    return sorted(medoids)


def test_kmedoids_matches_reference():
    torch.manual_seed(0)
    pts = torch.randn(3, 40, 5, dtype=torch.float64)
    got = kmedoids(torch.cdist(pts, pts), pts.norm(dim=-1), 6)
    for b in range(3):
        assert got[b].tolist() == reference_kmedoids(pts[b], 6)


def full_update_kmedoids(dist: torch.Tensor, norms: torch.Tensor, k: int, iters: int, tol: float) -> torch.Tensor:
    """k-medoids summing every point's masked distance row at every update (no reuse of the
    sums of unchanged clusters), one video at a time: what the incremental update must equal."""
    out = []
    for d0, n0 in zip(dist, norms):
        d = d0 - d0.max() - 1
        d.diagonal().sub_(1)
        med = [int(n0.argmax())]
        nearest = d[med[0]].clone()
        while len(med) < k:
            med.append(int(nearest.argmax()))
            nearest = torch.minimum(nearest, d[med[-1]])
        med = torch.tensor(med)
        for _ in range(iters):
            assign = d[med].argmin(0)                                      # (N,)
            cost = (d * (assign[:, None] == assign[None, :])).sum(-1)      # (N,)
            new = torch.stack([torch.where(assign == c, cost, float("inf")).argmin() for c in range(k)])
            shift = float((d0[new, med] * (new != med)).sum())
            med = new
            if shift < tol:
                break
        out.append(med.sort().values)
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(6))
def test_kmedoids_reusing_unchanged_cluster_sums_equals_summing_every_row(seed):
    """Rounded points make exact distance ties, which the summation order decides."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(8, 50, 4, generator=g)
    pts = pts.round() if seed % 2 else pts
    dist, norms = torch.cdist(pts, pts), pts.norm(dim=-1)
    for k, iters, tol in [(1, 60, 1e-5), (5, 60, 1e-5), (12, 3, 1e-5), (12, 60, -1.0), (50, 4, 1e-5)]:
        assert torch.equal(kmedoids(dist, norms, k, iters, tol), full_update_kmedoids(dist, norms, k, iters, tol))


def test_kmedoids_medoids_are_distinct_points_and_sorted():
    torch.manual_seed(1)
    pts = torch.randn(2, 60, 3)
    got = kmedoids(torch.cdist(pts, pts), pts.norm(dim=-1), 8)
    for row in got:
        assert row.tolist() == sorted(set(row.tolist()))


def test_kmedoids_memory_is_not_batch_k_n_n():
    """[64, 32, 528, 528] fp32 would be 2.3 GB; the batched version must stay far below."""
    code = (
        "import resource, torch\n"
        "from prvr.model import kmedoids\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(64, 528, 16)\n"
        "d = torch.cdist(x, x)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "kmedoids(d, x.norm(dim=-1), 32, iters=5)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mb = int(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 600, f"k-medoids grew RSS by {grown_mb} MB"


def small_model_cfg(**changes) -> ModelConfig:
    """A small MS-SL++ (8 clip units, 6 medoids) over the packaged settings."""
    return default_config().model.replace(video_dim=24, text_dim=16, hidden_size=32, num_heads=4, map_size=8,
                                          max_ctx_len=20, max_desc_len=10, cluster_num=6, **changes)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = small_model_cfg()
    return PRVRModel(cfg).eval()


def _batch(V=5, Q=7, T=20):
    g = torch.Generator().manual_seed(3)
    units = torch.randn(V, 8, 24, generator=g)
    frames = torch.randn(V, T, 24, generator=g)
    fmask = torch.ones(V, T, dtype=torch.bool)
    fmask[1, 12:] = False
    fmask[3, 5:] = False
    tokens = torch.randn(Q, 10, 16, generator=g)
    tmask = torch.ones(Q, 10, dtype=torch.bool)
    tmask[2, 4:] = False
    return tokens, tmask, units, frames, fmask


def test_span_table_counts_every_contiguous_span():
    spans = span_table(32)
    assert len(spans) == 528
    assert len({tuple(s) for s in spans.tolist()}) == 528
    assert (spans[:, 1] > spans[:, 0]).all() and spans.max() == 32 and spans.min() == 0


def test_sinusoidal_table_is_fixed_and_distinct():
    t = sinusoidal_table(32, 256)
    assert t.shape == (32, 256)
    assert torch.equal(t, sinusoidal_table(32, 256))
    assert torch.cdist(t, t).add(torch.eye(32) * 10).min() > 0.1


def test_cluster_distances_equal_explicit_concatenation(model):
    """The Gram-matrix shortcut gives the distances and norms of explicit [span ; length] vectors,
    and the medoids are k-medoids of those. (Medoids of float32 and float64 distances may differ
    at near-ties, which CPUs break differently, so the medoids are compared on one matrix.)"""
    _, _, units, _, _ = _batch()
    with torch.no_grad():
        enc = model.clip_encoder(units, torch.ones(units.shape[:2], dtype=torch.bool))
        spans = model.span_pool @ enc
        lengths = model.spans[:, 1] - model.spans[:, 0] - 1
        explicit = torch.cat([spans, model.length_table[lengths].expand(len(units), -1, -1)], -1)
        want = torch.cdist(explicit.double(), explicit.double())
        got, norms = model.span_distances(enc)
        medoids = model.cluster_spans(enc)
    assert got.shape == want.shape == (len(units), 36, 36)
    assert torch.allclose(got.double(), want, atol=2e-3, rtol=1e-4), (got.double() - want).abs().max()
    assert torch.allclose(norms.double(), explicit.double().norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert torch.equal(medoids, kmedoids(got, norms, model.cfg.cluster_num, model.cfg.kmedoids_iters,
                                         model.cfg.kmedoids_tol))


def padded_reference(enc: FeatureEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder written plainly: every layer over all B x L positions, padding included."""
    norm, drop, linear, relu = enc.project
    h = relu(linear(drop(norm(x))))
    h = enc.pos_drop(enc.pos_norm(h + enc.position.weight[: x.shape[1]]))
    a, (B, L, H) = enc.attention, h.shape
    q, k, v = a.qkv(h).view(B, L, 3, a.heads, H // a.heads).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-1, -2) / math.sqrt(H // a.heads)).masked_fill(
        ~mask[:, None, None, :], torch.finfo(h.dtype).min)
    y = (a.attn_drop(att.softmax(-1)) @ v).transpose(1, 2).reshape(B, L, H)
    return a.norm(h + a.out_drop(a.out(y)))


def test_feature_encoder_skips_padding_yet_equals_the_padded_forward():
    """Training: the same outputs and gradients as the plain padded forward, from the same
    dropout masks (the random stream ends where the plain forward's does); zeros at padding."""
    torch.manual_seed(0)
    enc = FeatureEncoder(24, 32, 20, 4, 0.1).train()
    x = torch.randn(5, 20, 24, generator=torch.Generator().manual_seed(3))
    mask = torch.arange(20)[None, :] < torch.tensor([20, 12, 3, 20, 7])[:, None]
    results = []
    for forward in (enc, lambda x, m: padded_reference(enc, x, m)):
        torch.manual_seed(1)
        out = forward(x, mask)
        rng = torch.get_rng_state()
        out[mask].square().sum().backward()
        results.append((out.detach(), rng, {n: p.grad.clone() for n, p in enc.named_parameters()}))
        enc.zero_grad(set_to_none=True)
    (got, rng_got, grad_got), (want, rng_want, grad_want) = results
    assert torch.equal(rng_got, rng_want)
    assert torch.allclose(got[mask], want[mask], atol=1e-6), (got[mask] - want[mask]).abs().max()
    assert torch.count_nonzero(got[~mask]) == 0
    for name, g in grad_want.items():
        assert torch.allclose(grad_got[name], g, atol=1e-6, rtol=1e-5), name
    with torch.no_grad():   # the masks matter: without dropout the outputs are far apart
        assert (enc.eval()(x, mask)[mask] - want[mask]).abs().max() > 0.1


def test_video_embeddings_do_not_depend_on_batch_padding(model):
    """A video padded to its batch mates' length encodes as it does alone."""
    _, _, units, frames, fmask = _batch()
    with torch.no_grad():
        batch = model.encode_videos(units, frames, fmask)
        alone = model.encode_videos(units[3:4], frames[3:4, :5], fmask[3:4, :5])
    assert torch.equal(batch.spans[3], alone.spans[0])
    assert torch.allclose(batch.clips[3], alone.clips[0], atol=1e-6)
    assert torch.allclose(batch.attended[3], alone.attended[0], atol=1e-6)


def test_score_equals_direct_per_pair_forward(model):
    """score() on precomputed K attended vectors == the per-(query, video) KCGA forward."""
    tokens, tmask, units, frames, fmask = _batch()
    with torch.no_grad():
        q = model.encode_queries(tokens, tmask)
        v = model.encode_videos(units, frames, fmask)
        s = score(q, v.clips, v.attended, alpha=0.7)
        enc_frames = model.frame_encoder(frames, fmask)
        for i in range(len(q)):
            for j in range(len(units)):
                cos = F.cosine_similarity(q[i][None], v.clips[j], dim=-1)          # (K,)
                key = int(cos.argmax())
                att_logits = model.kcga_key(enc_frames[j]) @ v.clips[j, key]       # (T,)
                att_logits[~fmask[j]] = float("-inf")
                attended = att_logits.softmax(0) @ model.kcga_value(enc_frames[j])  # (H,)
                frame = F.cosine_similarity(q[i], attended, dim=0)
                assert int(s.key_clip[i, j]) == key
                assert abs(float(s.clip[i, j]) - float(cos.max())) < 1e-5
                assert abs(float(s.frame[i, j]) - float(frame)) < 1e-5
                assert abs(float(s.fused[i, j]) - (0.7 * float(cos.max()) + 0.3 * float(frame))) < 1e-5


def test_training_forward_scores_equal_score(model):
    tokens, tmask, units, frames, fmask = _batch()
    with torch.no_grad():
        out = model(tokens, tmask, units, frames, fmask)
        q = model.encode_queries(tokens, tmask)
        v = model.encode_videos(units, frames, fmask)
        s = score(q, v.clips, v.attended, model.cfg.alpha)
        raw = torch.einsum("qh,vkh->qvk", q, v.clips).max(-1).values
    for kind in ("clip", "frame", "fused"):
        assert torch.allclose(out[kind], getattr(s, kind), atol=1e-5), kind
    assert torch.allclose(out["clip_raw"], raw, atol=1e-5)


def test_score_chunking_does_not_change_results(model):
    tokens, tmask, units, frames, fmask = _batch(V=9)
    with torch.no_grad():
        q = model.encode_queries(tokens, tmask)
        v = model.encode_videos(units, frames, fmask)
        whole = score(q, v.clips, v.attended, 0.5)
        chunked = score(q, v.clips, v.attended, 0.5, video_chunk=2)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.parametrize("variant,k", [("ms-sl++", 6), ("ms-sl", 36), ("mean-pool", 1)])
def test_variants_share_one_interface(variant, k):
    torch.manual_seed(0)
    cfg = small_model_cfg(variant=variant)
    m = PRVRModel(cfg).eval()
    tokens, tmask, units, frames, fmask = _batch()
    with torch.no_grad():
        v = m.encode_videos(units, frames, fmask)
        out = m(tokens, tmask, units, frames, fmask)
    assert v.clips.shape == (5, k, 32) and v.attended.shape == (5, k, 32)
    assert v.spans.shape == (5, k, 2)
    assert ((v.spans[..., 1] > v.spans[..., 0]) & (v.spans[..., 1] <= 8)).all()
    assert out["fused"].shape == (7, 5) and torch.isfinite(out["fused"]).all()


def test_gradients_flow_through_medoid_clips(model):
    model.train()
    try:
        tokens, tmask, units, frames, fmask = _batch()
        out = model(tokens, tmask, units, frames, fmask)
        (out["clip"].sum() + out["frame"].sum()).backward()
        assert model.clip_encoder.project[2].weight.grad.abs().sum() > 0
        assert model.kcga_key.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("dims,expected", [((3072, 768), 4.85e6), ((1024, 1024), 3.37e6)])
def test_parameter_count_matches_paper(dims, expected):
    m = PRVRModel(default_config().model.replace(video_dim=dims[0], text_dim=dims[1]))
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - expected) / expected < 0.005, n


def test_model_requires_dims_from_data():
    with pytest.raises(ValueError, match="video_dim"):
        PRVRModel(default_config().model)        # params.yaml leaves the dims at 0
