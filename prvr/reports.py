"""Human-readable reports of a run: terminal tables, Markdown and a self-contained HTML page.

Pure formatting of the dicts the stages return (metrics, dataset stats, promotion
decision); nothing here computes a figure.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping

__all__ = ["format_table", "format_decision", "report_markdown", "report_html", "SCORES"]

SCORES = ("fused", "clip", "frame")


def format_table(metrics: dict[str, Any]) -> str:
    """Recall table of the three scores, as printed by the CLI and the demo."""
    rows = [f"{'score':<7}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'R@100':>7}{'SumR':>8}{'MedR':>7}{'MnR':>8}"]
    for kind in SCORES:
        m = metrics[kind]
        rows.append(f"{kind:<7}{m['r1']:>7.1f}{m['r5']:>7.1f}{m['r10']:>7.1f}{m['r100']:>7.1f}"
                    f"{m['sumr']:>8.1f}{m['medr']:>7.1f}{m['mnr']:>8.1f}")
    bins = metrics["fused"].get("mv_bins")
    if bins:
        rows.append("fused SumR by moment/video length ratio: " +
                    ", ".join(f"{b}: {v['sumr']:.1f} (n={v['n']})" for b, v in bins.items()))
    return "\n".join(rows)


def _img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _recall_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for s in SCORES:
        m = metrics[s]
        rows.append([s] + [f"{m[k]:.1f}" for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "mnr")])
    return rows


_RECALL_HEAD = ["score", "R@1", "R@5", "R@10", "R@100", "SumR", "MedR", "MnR"]


def _mv_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    bins = metrics["fused"].get("mv_bins") or {}
    return [[b, str(v["n"])] + [f"{metrics[s]['mv_bins'][b]['sumr']:.1f}" for s in SCORES]
            for b, v in bins.items()]


def report_markdown(metrics: Mapping[str, Any]) -> str:
    """Recall table and per-M/V-bin SumR as Markdown (the KFP UI renders it)."""
    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
               ["| " + " | ".join(r) + " |" for r in rows]

    lines = [f"# Evaluation: {metrics.get('variant', '')} on {metrics.get('split', '')}", "",
             f"{metrics.get('num_queries')} queries x {metrics.get('num_videos')} videos, "
             f"alpha={metrics.get('alpha')}, epoch {metrics.get('epoch')}", ""]
    lines += table(_RECALL_HEAD, _recall_rows(metrics))
    mv = _mv_rows(metrics)
    if mv:
        lines += ["", "## SumR per moment/video length bin", ""]
        lines += table(["M/V bin", "queries"] + list(SCORES), mv)
    return "\n".join(lines) + "\n"


def report_html(metrics: Mapping[str, Any], plots: list[Path]) -> str:
    """A self-contained HTML page: recall table, M/V table and the PNG charts inlined as base64."""
    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    title = f"prvr evaluation: {metrics.get('variant', '')} on {metrics.get('split', '')}"
    parts = [
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}img{max-width:100%}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>{metrics.get('num_queries')} queries x {metrics.get('num_videos')} videos, "
        f"alpha={metrics.get('alpha')}, checkpoint epoch {metrics.get('epoch')}</p>",
        "<h2>Recall</h2>", table(_RECALL_HEAD, _recall_rows(metrics)),
    ]
    mv = _mv_rows(metrics)
    if mv:
        parts += ["<h2>SumR per moment/video length bin</h2>", table(["M/V bin", "queries"] + list(SCORES), mv)]
    parts += [_img_tag(p, p.stem) for p in plots]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def format_decision(decision: Mapping[str, Any]) -> str:
    """One paragraph for terminals: what the promotion gate decided and why."""
    head = (f"registry {decision.get('registry_uri')} model {decision.get('model_name')}: "
            + (f"promoted {decision['version']}" if decision.get("promoted")
               else f"registered {decision['version']}, not promoted" if decision.get("version")
               else "not registered"))
    return "\n".join([head, f"reason: {decision.get('reason')}",
                      f"data version: {decision.get('data_version')}; {decision.get('index_note')}"])
