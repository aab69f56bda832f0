"""Quality of each model variant on one collection: train, evaluate on test, write the table.

Trains ms-sl++, ms-sl and the mean-pool baseline with the same params.yaml (plus
--set overrides), evaluates each on the test split and prints fused SumR overall
and per moment-to-video (M/V) ratio bin. With --readme the table replaces the
block between the result markers of README.md for that collection, from the result file
results/quality-<collection>.json this script writes (benchmarks/results.py).

    python benchmarks/quality.py --data data/small --out runs/quality --readme README.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import results as result_files
from prvr.config import load_config
from prvr.evaluate import evaluate
from prvr.train import train

VARIANTS = ("ms-sl++", "ms-sl", "mean-pool")


def run(data: Path, out: Path, variants: list[str], overrides: list[str]) -> dict[str, dict]:
    results = {}
    for variant in variants:
        cfg = load_config(None, overrides + [f"model.variant={variant}"])
        run_dir = out / variant.replace("+", "p")
        summary = train(cfg, data, run_dir, progress=False)
        metrics = evaluate(cfg, data, run_dir / "model.pt", "test", run_dir / "test_metrics.json")
        results[variant] = {"train": {k: v for k, v in summary.items() if k != "history"},
                            "test": metrics}
    return results


def table(results: dict[str, dict], title: str) -> str:
    variants = list(results)
    bins = list(next(iter(results.values()))["test"]["fused"].get("mv_bins", {}))
    head = "| variant | R@1 | R@5 | R@10 | R@100 | SumR | " + " | ".join(f"SumR M/V {b}" for b in bins) + " |"
    rows = [f"**{title}** (test split, fused score)", "", head,
            "|" + "---|" * (6 + len(bins))]
    for v in variants:
        m = results[v]["test"]["fused"]
        cells = [f"{m[k]:.1f}" for k in ("r1", "r5", "r10", "r100", "sumr")]
        cells += [f"{m['mv_bins'][b]['sumr']:.1f}" if b in m.get("mv_bins", {}) else "-" for b in bins]
        rows.append(f"| {v} | " + " | ".join(cells) + " |")
    if "ms-sl++" in results and "mean-pool" in results and bins:
        pp, mp = results["ms-sl++"]["test"]["fused"], results["mean-pool"]["test"]["fused"]
        gains = {b: pp["mv_bins"][b]["sumr"] - mp["mv_bins"][b]["sumr"] for b in bins
                 if b in pp["mv_bins"] and b in mp["mv_bins"]}
        rows += ["", f"MS-SL++ minus mean-pool, SumR: overall {pp['sumr'] - mp['sumr']:+.1f}; by M/V bin "
                 + ", ".join(f"{b}: {g:+.1f}" for b, g in gains.items())]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="collection folder ROOT/COLL")
    p.add_argument("--out", required=True, help="folder for the runs and results.json")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--readme", default=None, help="README.md whose result block to rewrite")
    args = p.parse_args()
    out, started = Path(args.out), result_files.meta()    # the commit that ran, not one made meanwhile
    results_json = run(Path(args.data), out, args.variants.split(","), args.overrides)
    (out / "results.json").write_text(json.dumps(results_json, indent=2))
    text = table(results_json, f"{Path(args.data).name} ({', '.join(args.overrides) or 'params.yaml'})")
    print(text)
    try:
        from prvr.plots import plot_variants
        plot_variants({v: r["test"] for v, r in results_json.items()}, out / "mv_bins_by_variant.png")
    except ImportError:
        pass
    name = f"quality-{Path(args.data).name}"
    print(f"wrote {result_files.write(name, results_json, text, started=started)}")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(result_files.update(readme.read_text()))


if __name__ == "__main__":
    main()
