"""Hand-worked cases for ranks, recalls, SumR and the M/V bins."""
import numpy as np
import pytest

from prvr.metrics import metrics_from_ranks, mv_bin_labels, ranks_from_scores, retrieval_metrics


def test_ranks_hand_worked():
    scores = np.array([[0.9, 0.1, 0.5],    # true 0 -> best -> rank 1
                       [0.9, 0.1, 0.5],    # true 1 -> worst -> rank 3
                       [0.2, 0.8, 0.5]])   # true 2 -> second -> rank 2
    assert ranks_from_scores(scores, np.array([0, 1, 2])).tolist() == [1, 3, 2]
    assert ranks_from_scores(scores, [0, 1, 2]).dtype == np.int64


def test_ties_are_pessimistic():
    scores = np.array([[0.5, 0.5, 0.5, 0.1],
                       [0.3, 0.7, 0.7, 0.9],
                       [1.0, 1.0, 1.0, 1.0]])
    # row 0: two others tie at 0.5 -> rank 3; row 1: true=1 ties with 2, below 3 -> rank 3;
    # row 2: constant scorer -> last.
    assert ranks_from_scores(scores, [0, 1, 2]).tolist() == [3, 3, 4]


def test_chunks_equal_whole():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((50, 30)).astype(np.float32)
    truth = rng.integers(0, 30, 50)
    whole = ranks_from_scores(scores, truth)
    chunked = np.concatenate([ranks_from_scores(scores[i:i + 7], truth[i:i + 7]) for i in range(0, 50, 7)])
    assert np.array_equal(whole, chunked)


def test_single_query():
    m = retrieval_metrics(np.array([[0.1, 0.3, 0.2]]), np.array([2]))
    assert m["n"] == 1 and m["medr"] == 2.0 and m["mnr"] == 2.0
    assert (m["r1"], m["r5"], m["r10"], m["r100"], m["sumr"]) == (0.0, 100.0, 100.0, 100.0, 300.0)
    assert "mv_bins" not in m


def test_metrics_from_ranks_values():
    ranks = np.array([1, 2, 6, 11, 101, 3, 1, 50])
    m = metrics_from_ranks(ranks)
    assert m["r1"] == pytest.approx(25.0)
    assert m["r5"] == pytest.approx(50.0)       # 1, 2, 3, 1
    assert m["r10"] == pytest.approx(62.5)      # + 6
    assert m["r100"] == pytest.approx(87.5)     # all but 101
    assert m["sumr"] == pytest.approx(225.0)
    assert m["medr"] == pytest.approx(4.5)
    assert m["mnr"] == pytest.approx(ranks.mean())
    assert m["n"] == 8


def test_mv_bins():
    ranks = [1, 7, 1, 200, 3, 1]
    ratios = [0.05, 0.19, 0.2, None, 1.0, 0.85]
    m = metrics_from_ranks(ranks, ratios)
    bins = m["mv_bins"]
    assert list(bins) == ["0.0-0.2", "0.2-0.4", "0.8-1.0"]    # empty bins omitted
    assert bins["0.0-0.2"]["n"] == 2 and bins["0.0-0.2"]["r1"] == 50.0 and bins["0.0-0.2"]["r10"] == 100.0
    assert bins["0.2-0.4"] == {"n": 1, "r1": 100.0, "r5": 100.0, "r10": 100.0, "r100": 100.0, "sumr": 400.0}
    assert bins["0.8-1.0"]["n"] == 2 and bins["0.8-1.0"]["r1"] == 50.0   # ratio 1.0 in the last bin
    assert sum(b["n"] for b in bins.values()) == 5                       # None skipped
    assert m["n"] == 6


def test_bin_labels_and_edges():
    assert mv_bin_labels(0.2) == ["0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"]
    assert mv_bin_labels(0.25)[-1] == "0.75-1.00"
    # 0.6 / 0.2 is 2.9999... in floating point; it must still land in 0.6-0.8.
    assert list(metrics_from_ranks([1], [0.6])["mv_bins"]) == ["0.6-0.8"]
    # numpy ratios with NaN for unknown moments are skipped like None
    m = metrics_from_ranks([1, 2], np.array([0.1, np.nan], dtype=np.float32))
    assert m["mv_bins"]["0.0-0.2"]["n"] == 1


def test_nan_scores_rejected():
    scores = np.array([[0.1, np.nan], [0.2, 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(scores, [0, 1])


@pytest.mark.parametrize("scores,truth,match", [
    (np.zeros(3), [0], "matrix"),
    (np.zeros((2, 3)), [0], "one video index per query"),
    (np.zeros((1, 3)), [3], "truth indices"),
    (np.zeros((1, 3)), [0.0], "integer"),
])
def test_bad_inputs(scores, truth, match):
    with pytest.raises(ValueError, match=match):
        ranks_from_scores(scores, np.asarray(truth))


def test_bad_ranks_and_ratios():
    with pytest.raises(ValueError, match="zero queries"):
        metrics_from_ranks([])
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks([0, 1])
    with pytest.raises(ValueError, match="entries"):
        metrics_from_ranks([1, 2], [0.1])
    with pytest.raises(ValueError, match="outside"):
        metrics_from_ranks([1], [1.5])
