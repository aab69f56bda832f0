"""Shared fixtures: tiny collections, built once per session (read-only: copy before mutating)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from prvr import stages
from prvr.config import load_config
from prvr.synth import synthesize

from helpers.servers import PUSHGATEWAY_BIN, Pushgateway, pushgateway_available

TOY_DIM, TOY_TEXT_DIM = 6, 8
# A small model so a tiny-preset epoch takes seconds on 2 CPU cores (the `trained` fixture;
# tests/test_stages.py's FAST is the same list).
STAGE_FAST = ["model.hidden_size=64", "model.map_size=8", "model.cluster_num=8", "model.max_ctx_len=32",
              "model.kmedoids_iters=10", "train.epochs=1"]
# Frames of each video, in time order. Rows in feature.bin are deliberately interleaved
# (not grouped by video) so readers cannot assume contiguous rows.
TOY_VIDEOS = {"vidA": ["vidA_0", "vidA_1", "vidA_2"], "vidB": ["vidB_0", "vidB_1", "vidB_2", "vidB_3"],
              "vidC": ["vidC_0", "vidC_1"]}
TOY_ROWS = ["vidB_0", "vidA_0", "vidB_1", "vidA_1", "vidC_0", "vidB_2", "vidA_2", "vidC_1", "vidB_3"]
TOY_CAPTIONS = {
    "train": ["vidA#enc#0 a man opens the door", "vidA#enc#1\tthe man   sits down ",
              "vidB#enc#0 a dog runs in the park"],
    "test": ["vidC#enc#0 someone waves at the camera"],
}


def toy_row_values(row: int) -> np.ndarray:
    """The known content of feature row ``row``."""
    return np.arange(TOY_DIM, dtype=np.float32) + 100.0 * row


def write_toy_collection(root: Path, name: str = "toy") -> Path:
    """A public-format collection written by hand (not by prvr.synth), with text features."""
    coll = root / name
    feat = coll / "FeatureData" / "i3d"
    text = coll / "TextData"
    feat.mkdir(parents=True)
    text.mkdir()
    np.stack([toy_row_values(i) for i in range(len(TOY_ROWS))]).astype("<f4").tofile(feat / "feature.bin")
    (feat / "id.txt").write_text(" ".join(TOY_ROWS[:4]) + "\n" + "\n".join(TOY_ROWS[4:]) + "\n")
    (feat / "shape.txt").write_text(f"{len(TOY_ROWS)} {TOY_DIM}\n")
    (feat / "video2frames.txt").write_text(repr(TOY_VIDEOS))
    for split, lines in TOY_CAPTIONS.items():
        (text / f"{name}{split}.caption.txt").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    with h5py.File(text / f"roberta_{name}_query_feat.hdf5", "w") as f:
        for lines in TOY_CAPTIONS.values():
            for line in lines:
                cap_id = line.split()[0]
                f.create_dataset(cap_id, data=rng.standard_normal((len(line.split()), TOY_TEXT_DIM)).astype("f4"))
    (coll / "moments.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"cap_id": "vidA#enc#0", "start": 0, "end": 1, "num_frames": 3},
        {"cap_id": "vidB#enc#0", "start": 0, "end": 4, "num_frames": 4},
        {"desc_id": 7, "vid_name": "vidC", "desc": "someone waves at  the camera", "ts": [1.0, 4.0],
         "duration": 20.0},
    ]) + "\n")
    return coll


@pytest.fixture
def toy_collection(tmp_path: Path) -> Path:
    """A fresh hand-built collection per test (cheap; tests may break its files)."""
    return write_toy_collection(tmp_path)


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prvr synth --preset tiny`` output, without text features."""
    return synthesize(tmp_path_factory.mktemp("synth"), "tiny", preset="tiny", seed=2018)


@pytest.fixture(scope="session")
def text_encoder():
    """The encoder the default params.yaml names (what `prvr encode-text` and a served worker use)."""
    from prvr.text import TextEncoder

    return TextEncoder.from_config(load_config())


@pytest.fixture(scope="session")
def fp32_encoder():
    """The MiniLM in float32 on torch: the reference the other runtimes are held to."""
    from prvr.text import TextEncoder

    return TextEncoder("minilm", max_tokens=30, precision="float32")


@pytest.fixture(scope="session")
def tiny_encoded(tmp_path_factory: pytest.TempPathFactory, text_encoder) -> Path:
    """A tiny synthetic collection with its MiniLM text-feature HDF5: ready to train on."""
    from prvr.text import encode_collection

    path = synthesize(tmp_path_factory.mktemp("encoded"), "tiny", preset="tiny", seed=2018)
    encode_collection(path, text_encoder)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_encoded: Path) -> dict:
    """One preprocess + 1-epoch training of a small model on ``tiny_encoded`` (root/ds, root/run),
    shared by tests/test_stages.py and tests/test_gate.py: read-only, copy before changing."""
    root = tmp_path_factory.mktemp("stages")
    cfg = load_config(overrides=STAGE_FAST)
    stages.preprocess(str(tiny_encoded), root / "ds", cfg)
    result = stages.train_step(root / "ds", root / "run", cfg)
    return {"root": root, "cfg": cfg, "result": result}


@pytest.fixture(scope="module")
def pushgateway():
    """A real Pushgateway on 127.0.0.1 (Debian's prometheus-pushgateway), one per test module."""
    if not pushgateway_available():
        pytest.skip(f"prometheus-pushgateway binary not found at {PUSHGATEWAY_BIN} "
                    "(apt-get install prometheus-pushgateway; CI installs it)")
    gw = Pushgateway()
    yield gw
    gw.stop()
