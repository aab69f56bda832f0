"""prvr.plots: PNG charts of evaluation metrics, drawn without a display."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest

from prvr.plots import MV_PNG, RECALL_PNG, plot_evaluation, plot_variants

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_metrics(base: float, bins: bool = True) -> dict:
    def block(offset: float) -> dict:
        m = {"r1": base + offset, "r5": base + 10, "r10": base + 20, "r100": 90.0, "medr": 4.0, "mnr": 9.5}
        m["sumr"] = m["r1"] + m["r5"] + m["r10"] + m["r100"]
        if bins:
            m["mv_bins"] = {f"{lo:.1f}-{lo + 0.2:.1f}": {"n": 10 + i, "r1": 1.0, "r5": 2.0, "r10": 3.0,
                                                         "r100": 50.0, "sumr": 100.0 + 10 * i + offset}
                            for i, lo in enumerate((0.0, 0.2, 0.4))}
        return m
    return {"fused": block(2.0), "clip": block(1.0), "frame": block(0.0), "split": "test",
            "variant": "ms-sl++"}


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path).shape


def test_plot_evaluation_writes_recall_and_mv_charts(tmp_path: Path) -> None:
    paths = plot_evaluation(fake_metrics(10.0), tmp_path / "plots")
    assert [p.name for p in paths] == [RECALL_PNG, MV_PNG]
    for p in paths:
        h, w, _ = _png_shape(p)
        assert h > 200 and w > 300


def test_plot_evaluation_without_moments_draws_recall_only(tmp_path: Path) -> None:
    paths = plot_evaluation(fake_metrics(10.0, bins=False), tmp_path)
    assert [p.name for p in paths] == [RECALL_PNG]
    assert not (tmp_path / MV_PNG).exists()


def test_plot_variants_side_by_side(tmp_path: Path) -> None:
    out = plot_variants({"ms-sl++": fake_metrics(20.0), "ms-sl": fake_metrics(15.0),
                         "mean-pool": fake_metrics(5.0, bins=False)}, tmp_path / "sub" / "variants.png")
    assert out == tmp_path / "sub" / "variants.png"
    assert _png_shape(out)[1] > 300
    with pytest.raises(ValueError, match="at least one"):
        plot_variants({}, tmp_path / "none.png")


def test_plots_leave_pyplot_state_alone(tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    plot_evaluation(fake_metrics(1.0), tmp_path)
    assert matplotlib.get_backend() == backend
