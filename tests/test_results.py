"""Every measured figure in the README and docs comes from a committed result file.

A results block is the Markdown its measuring script wrote into results/NAME.json plus a
source line; rewriting the blocks from the files must leave the documents unchanged, so a
block edited by hand (or a figure whose file is missing) fails here.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
META_KEYS = {"machine", "date", "commit", "command", "torch"}


def _results_module():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "benchmarks" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


results = _results_module()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_results_blocks_equal_their_files(doc: Path) -> None:
    text = doc.read_text()
    assert results.update(text) == text, (
        f"{doc.name}: a results block differs from results/*.json; "
        "rerun the measuring script or `python benchmarks/results.py`")


# what a measured figure looks like: a latency, a rate, a speed-up, a memory size, a SumR
MEASURED = re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|us|videos/s|queries/s|req/s|GiB|GB/s)\b"
                      r"|\b\d+(?:\.\d+)?x\b|SumR \d")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documents_quote_measured_figures_only_in_results_blocks(doc: Path) -> None:
    text = results.BLOCK.sub("", doc.read_text())
    assert MEASURED.findall(text) == [], f"{doc.name}: measured figures outside a results block"


def test_the_measured_figure_pattern_catches_figures() -> None:
    found = MEASURED.findall("p50 11.6 ms, 20.7 videos/s, 31x, 5.9 GiB, SumR 378 | 128 videos, 2 cores")
    assert found == ["11.6 ms", "20.7 videos/s", "31x", "5.9 GiB", "SumR 3"]


def test_the_measured_figure_pattern_leaves_settings_alone() -> None:
    """Settings and budgets the docs state (a limit, a timeout, a target) are not measurements."""
    text = ("serve.max_body_bytes (4 MiB), an 8-GiB budget, a 20-ms target, above 0.25 s, "
            "60 s timeout, 2,179 videos, nprobe 128, 2 x N x K x H x 4 bytes, S3's cap (5 GB)")
    assert MEASURED.findall(text) == []


BLOCK_NAMES = sorted({m["name"] for doc in DOCS for m in results.BLOCK.finditer(doc.read_text())})


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_every_block_names_a_committed_file_with_its_provenance(name: str) -> None:
    doc = json.loads((ROOT / "results" / f"{name}.json").read_text())
    assert META_KEYS <= set(doc["meta"]), name
    assert len(doc["meta"]["commit"]) == 40, name
    assert doc["figures"] != {} and "|" in doc["markdown"], name


def test_write_then_render_round_trip(tmp_path: Path) -> None:
    path = results.write("demo", {"p50_ms": 1.25}, "| what | figure |\n|---|---|\n| p50 | 1.25 ms |",
                         argv=["bench.py", "--x"], folder=tmp_path)
    doc = json.loads(path.read_text())
    assert doc["figures"] == {"p50_ms": 1.25} and doc["meta"]["command"].endswith("bench.py --x")
    block = "<!-- results:demo:start -->\nold 9.99 ms\n<!-- results:demo:end -->"
    new = results.update(f"before\n{block}\nafter", folder=tmp_path)
    assert "old 9.99" not in new and "| p50 | 1.25 ms |" in new and "results/demo.json" in new
    assert new.startswith("before\n") and new.endswith("\nafter")
    assert results.update(new, folder=tmp_path) == new


def test_block_without_file_and_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        results.update("<!-- results:missing:start -->\nx\n<!-- results:missing:end -->",
                       folder=tmp_path)
    with pytest.raises(ValueError, match="result name"):
        results.write("../escape", {"a": 1}, "x", folder=tmp_path)
