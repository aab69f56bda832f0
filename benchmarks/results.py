"""Result files under results/ and the README blocks written from them.

Every figure the README or the docs quote comes from a JSON file that the measuring script
wrote here: its raw figures, the machine, date, commit and command line that produced them,
and the Markdown block the script rendered from them. The README holds that block between
`<!-- results:NAME:start -->` and `<!-- results:NAME:end -->`; `python benchmarks/results.py
--readme README.md` rewrites every block from its file (`--check` fails when one differs),
so a block is never edited by hand (tests/test_results.py checks both).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
BLOCK = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.-]+):start -->\n(?P<body>.*?)"
                   r"<!-- results:(?P=name):end -->", re.S)
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def meta(argv: list[str] | None = None) -> dict[str, Any]:
    """Where, when and how a figure was measured: enough to rerun it and to judge it."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD"), "dirty": bool(dirty) and dirty != "unknown",
            "command": " ".join([Path(sys.executable).name] + list(sys.argv if argv is None else argv)),
            "python": platform.python_version(), "torch": torch.__version__}


def write(name: str, figures: dict[str, Any], markdown: str, argv: list[str] | None = None,
          folder: Path = RESULTS, started: dict[str, Any] | None = None) -> Path:
    """Write results/NAME.json atomically: the figures, their Markdown block and `meta`
    (`started`: the meta taken when a long run began, so its commit is the code that ran)."""
    if not NAME.match(name):
        raise ValueError(f"result name {name!r}: use letters, digits, '_', '-' and '.' only")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": started or meta(argv), "figures": figures, "markdown": markdown},
                              indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


def render(name: str, folder: Path = RESULTS) -> str:
    """The README block of results/NAME.json: the script's Markdown and a source line."""
    path = folder / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"README block {name!r} has no result file {path}")
    doc = json.loads(path.read_text())
    m = doc["meta"]
    cpu = f"{m['machine']['cpu']}, {m['machine']['cores']} cores"
    gpu = f", {m['machine']['gpu']}" if m["machine"].get("gpu") else ""
    source = (f"<sub>From `results/{name}.json`: {cpu}{gpu}; {m['date'][:10]}; commit "
              f"`{m['commit'][:10]}`{' (uncommitted changes)' if m.get('dirty') else ''}; "
              f"`{m['command']}`.</sub>")
    return f"{doc['markdown'].rstrip()}\n\n{source}\n"


def update(text: str, folder: Path = RESULTS) -> str:
    """`text` with every results block rewritten from its file."""
    return BLOCK.sub(lambda mt: (f"<!-- results:{mt['name']}:start -->\n{render(mt['name'], folder)}"
                                 f"<!-- results:{mt['name']}:end -->"), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", nargs="+", default=[str(ROOT / "README.md")],
                   help="Markdown files whose results blocks to rewrite")
    p.add_argument("--check", action="store_true", help="only report files whose blocks differ")
    args = p.parse_args(argv)
    stale = []
    for name in args.readme:
        path = Path(name)
        old = path.read_text()
        new = update(old)
        if new != old:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("results blocks differ from results/*.json in: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
