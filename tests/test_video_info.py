"""Video descriptions (videos.jsonl) travel into the index and are checked again on load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from prvr.errors import SearchIndexError
from prvr.model import VideoEmbeddings
from prvr.search import VideoIndex, build_index_from_embeddings

INFO = [{"title": "A kitchen", "duration_s": 30.0, "url": "https://example.org/v0"}, None,
        {"duration_s": 12.5}]


def _index(tmp_path: Path, info) -> Path:
    gen = torch.Generator().manual_seed(0)
    emb = VideoEmbeddings(clips=torch.randn(3, 2, 4, generator=gen), spans=torch.tensor([[[0, 1], [1, 2]]] * 3),
                          attended=torch.randn(3, 2, 4, generator=gen))
    return build_index_from_embeddings(emb, [20, 10, 5], ["v0", "v1", "v2"], tmp_path / "idx",
                                       model_version="m", map_size=2, alpha=0.7, video_info=info)


def test_descriptions_round_trip_and_are_hashed(tmp_path):
    idx = VideoIndex.load(_index(tmp_path, INFO))
    assert [idx.describe(i) for i in range(3)] == [INFO[0], {}, INFO[2]]
    meta = idx.manifest["video_info"]
    assert meta["described"] == 2
    assert meta["sha256"] == hashlib.sha256((tmp_path / "idx" / "videos.json").read_bytes()).hexdigest()


def test_no_descriptions_no_file(tmp_path):
    idx = VideoIndex.load(_index(tmp_path, [None, None, None]))
    assert idx.info is None and idx.manifest["video_info"] is None and idx.describe(1) == {}
    assert not (tmp_path / "idx" / "videos.json").exists()


def _rewrite(path: Path, entries, fix_hash: bool) -> None:
    f = path / "videos.json"
    f.write_text(json.dumps(entries))
    if fix_hash:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["video_info"]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("entries, fix_hash, needle", [
    ([{"title": "changed"}, None, None], False, "fail their sha256 check"),
    ([{"url": "javascript:alert(1)"}, None, None], True, "are not valid (ValidationError)"),
    ([{"title": "x", "html": "<b>"}, None, None], True, "are not valid (ValidationError)"),
    ([None, None], True, "are not valid (ValueError)"),
    ({"v0": {}}, True, "are not valid (ValueError)"),
])
def test_tampered_descriptions_are_refused(tmp_path, entries, fix_hash, needle):
    path = _index(tmp_path, INFO)
    _rewrite(path, entries, fix_hash)
    with pytest.raises(SearchIndexError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        VideoIndex.load(path)


def test_description_count_must_match(tmp_path):
    with pytest.raises(SearchIndexError, match="2 video descriptions for 3 videos"):
        _index(tmp_path, INFO[:2])
