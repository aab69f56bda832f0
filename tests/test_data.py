"""The public-format reader on a hand-built collection: values, memmap use, and every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import prvr.cli
from prvr.collection import BigFile, Collection, mv_bins, parse_video2frames, video_id_of
from prvr.errors import DataError
from conftest import TOY_DIM, TOY_ROWS, TOY_TEXT_DIM, TOY_VIDEOS, toy_row_values

FEAT = Path("FeatureData/i3d")


def expected_video(video_id: str) -> np.ndarray:
    return np.stack([toy_row_values(TOY_ROWS.index(f)) for f in TOY_VIDEOS[video_id]])


def test_reads_public_layout(toy_collection):
    coll = Collection(toy_collection)
    assert coll.name == "toy" and coll.video_dim == TOY_DIM and coll.text_dim == TOY_TEXT_DIM
    for vid in TOY_VIDEOS:
        feats = coll.video_features(vid)
        assert feats.dtype == np.float32 and feats.shape == (len(TOY_VIDEOS[vid]), TOY_DIM)
        np.testing.assert_array_equal(feats, expected_video(vid))
    caps = coll.captions("train")
    assert [c.cap_id for c in caps] == ["vidA#enc#0", "vidA#enc#1", "vidB#enc#0"]
    assert caps[1].text == "the man   sits down" and caps[1].video_id == "vidA"
    assert coll.videos("train") == ["vidA", "vidB"]
    assert coll.available_splits() == ["train", "test"]
    feats = coll.text_features(["vidB#enc#0", "vidA#enc#0"])
    assert [f.shape for f in feats] == [(7, TOY_TEXT_DIM), (6, TOY_TEXT_DIM)]
    assert video_id_of("castle_s01e01_seg02_clip_00#enc#3") == "castle_s01e01_seg02_clip_00"


def test_missing_split_is_named(toy_collection):
    coll = Collection(toy_collection)
    with pytest.raises(DataError, match="toyval.caption.txt"):
        coll.captions("val")
    stats = coll.check()
    assert stats["missing_splits"] == ["val"]
    assert stats["splits"]["train"] == {
        "videos": 2, "queries": 3, "queries_with_moments": 2,
        "frames_per_video": {"min": 3, "mean": 3.5, "median": 3.5, "max": 4},
        "mv_ratio_bins": {"0.0-0.2": 0, "0.2-0.4": 1, "0.4-0.6": 0, "0.6-0.8": 0, "0.8-1.0": 1}}
    assert stats["splits"]["test"]["videos"] == 1 and stats["text_dim"] == TOY_TEXT_DIM
    (toy_collection / "TextData/toytrain.caption.txt").unlink()
    with pytest.raises(DataError, match="toytrain.caption.txt"):
        Collection(toy_collection).check()


def test_moments_both_formats(toy_collection):
    coll = Collection(toy_collection)
    assert coll.mv_ratio("vidA#enc#0") == pytest.approx(1 / 3)
    assert coll.mv_ratio("vidB#enc#0") == 1.0
    assert coll.mv_ratio("vidC#enc#0") == pytest.approx(0.15)    # TVR line matched on (video, text)
    assert coll.mv_ratio("vidA#enc#1") is None
    (toy_collection / "moments.jsonl").write_text(json.dumps(
        {"cap_id": "vidA#enc#1", "vid_name": "vidA", "ts": [2, 12], "duration": 8}) + "\n")
    assert Collection(toy_collection).mv_ratio("vidA#enc#1") == 1.0    # clamped to [0, 1]
    (toy_collection / "moments.jsonl").unlink()
    assert Collection(toy_collection).moments() == {}
    assert mv_bins([0.0, 0.19, 0.2, 0.6, 0.99, 1.0]) == {"0.0-0.2": 2, "0.2-0.4": 1, "0.4-0.6": 0,
                                                          "0.6-0.8": 1, "0.8-1.0": 2}


def test_bigfile_reads_through_memmap(toy_collection, monkeypatch):
    bf = BigFile(toy_collection / FEAT)
    assert isinstance(bf.data, np.memmap) and bf.num_rows == len(TOY_ROWS)

    def forbidden(*args, **kwargs):
        raise AssertionError("feature.bin must not be loaded whole")

    monkeypatch.setattr(np, "fromfile", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    rows = bf.rows_of(["vidA_2", "vidB_0", "vidC_0"])
    np.testing.assert_array_equal(bf.read(rows), np.stack([toy_row_values(int(r)) for r in rows]))
    np.testing.assert_array_equal(bf.read([2, 3, 4]), np.stack([toy_row_values(r) for r in (2, 3, 4)]))
    assert not isinstance(bf.read([2, 3]), np.memmap)     # a copy: the memmap stays private


def test_video2frames_is_never_executed(toy_collection, tmp_path):
    marker = tmp_path / "PWNED"
    (toy_collection / FEAT / "video2frames.txt").write_text(
        "{'vidA': __import__('os').system('touch %s')}" % marker)
    with pytest.raises(DataError, match="video2frames.txt"):
        Collection(toy_collection).check()
    assert not marker.exists()


@pytest.mark.parametrize("content, needle", [
    ("['vidA']", "dict"),
    ("{'vidA': ['vidA_0', 3]}", "'vidA'"),
    ("{'vidA': 'vidA_0'}", "'vidA'"),
    ("{1: ['vidA_0']}", "1"),
    ("{'vidA': ['vidA_0'", "dict literal"),
])
def test_video2frames_must_be_dict_of_lists_of_str(toy_collection, content, needle):
    path = toy_collection / FEAT / "video2frames.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="video2frames.txt") as err:
        parse_video2frames(path)
    assert needle in str(err.value)


def test_video2frames_other_quoting(toy_collection):
    path = toy_collection / FEAT / "video2frames.txt"
    path.write_text('{"vidA": ["vidA_0", "vidA_1", "vidA_2"], \'vidB\': [\'vidB_0\'],}')
    assert parse_video2frames(path) == {"vidA": TOY_VIDEOS["vidA"], "vidB": ["vidB_0"]}


def _write(coll: Path, rel: str, text: str) -> None:
    (coll / rel).write_text(text)


def _append_caption(coll: Path, line: str) -> None:
    with open(coll / "TextData/toytrain.caption.txt", "a") as f:
        f.write(line + "\n")


def _nan_row(coll: Path) -> None:
    data = np.fromfile(coll / FEAT / "feature.bin", dtype="<f4").reshape(len(TOY_ROWS), TOY_DIM)
    data[TOY_ROWS.index("vidB_2"), 3] = np.nan
    data.tofile(coll / FEAT / "feature.bin")


def _drop_text_feature(coll: Path) -> None:
    with h5py.File(coll / "TextData/roberta_toy_query_feat.hdf5", "a") as f:
        del f["vidB#enc#0"]


def _nan_text_feature(coll: Path) -> None:
    with h5py.File(coll / "TextData/roberta_toy_query_feat.hdf5", "a") as f:
        f["vidA#enc#1"][0, 0] = np.inf


BAD_INPUTS = {
    "no feature.bin": (lambda c: (c / FEAT / "feature.bin").unlink(), ["feature.bin", "not found"]),
    "no id.txt": (lambda c: (c / FEAT / "id.txt").unlink(), ["id.txt", "not found"]),
    "no video2frames": (lambda c: (c / FEAT / "video2frames.txt").unlink(), ["video2frames.txt"]),
    "no FeatureData": (lambda c: shutil.rmtree(c / "FeatureData"), ["FeatureData"]),
    "shape vs id.txt": (lambda c: _write(c, f"{FEAT}/shape.txt", f"8 {TOY_DIM}"), ["id.txt", "shape.txt", "9", "8"]),
    "shape vs bytes": (lambda c: _write(c, f"{FEAT}/shape.txt", f"9 {TOY_DIM + 1}"), ["feature.bin", "bytes"]),
    "shape malformed": (lambda c: _write(c, f"{FEAT}/shape.txt", "9,6"), ["shape.txt", "9,6"]),
    "video without frames": (lambda c: _append_caption(c, "vidZ#enc#0 a ghost video"),
                             ["video2frames.txt", "'vidZ'"]),
    "frames not in id.txt": (lambda c: _write(c, f"{FEAT}/video2frames.txt",
                                               repr({**TOY_VIDEOS, "vidB": ["vidB_0", "vidB_9"]})),
                             ["id.txt", "'vidB'", "'vidB_9'"]),
    "cap_id without text features": (_drop_text_feature, ["roberta_toy_query_feat.hdf5", "'vidB#enc#0'"]),
    "NaN text features": (_nan_text_feature, ["roberta_toy_query_feat.hdf5", "NaN/Inf", "'vidA#enc#1'"]),
    "NaN video features": (_nan_row, ["feature.bin", "NaN/Inf", "'vidB_2'"]),
    "empty caption line": (lambda c: _append_caption(c, "\nvidA#enc#5 more"), ["toytrain.caption.txt:4", "empty"]),
    "caption without text": (lambda c: _append_caption(c, "vidA#enc#5"), ["toytrain.caption.txt:4", "vidA#enc#5"]),
    "repeated cap_id": (lambda c: _append_caption(c, "vidA#enc#0 again"), ["toytrain.caption.txt:4", "repeats"]),
    "empty split": (lambda c: _write(c, "TextData/toytest.caption.txt", ""), ["toytest.caption.txt", "empty"]),
    "moments malformed": (lambda c: _write(c, "moments.jsonl", '{"cap_id": "vidA#enc#0"}\n'),
                          ["moments.jsonl:1"]),
    "moments not numbers": (lambda c: _write(c, "moments.jsonl", '\n{"cap_id": "x", "start": "a", "end": 1, '
                                                                 '"num_frames": 3}\n'), ["moments.jsonl:2"]),
    "moment reversed": (lambda c: _write(c, "moments.jsonl", json.dumps(
        {"vid_name": "vidA", "desc_id": 1, "ts": [5, 2], "duration": 8})), ["moments.jsonl:1", "start <= end"]),
    "two feature folders": (lambda c: (c / "FeatureData/resnet").mkdir(), ["'i3d'", "'resnet'", "--video-feature"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_data_error(toy_collection, case):
    breaker, needles = BAD_INPUTS[case]
    breaker(toy_collection)
    with pytest.raises(DataError) as err:
        Collection(toy_collection).check()
    for needle in needles:
        assert needle in str(err.value), (case, str(err.value))


def test_reading_one_video_checks_its_values(toy_collection):
    _nan_row(toy_collection)
    coll = Collection(toy_collection)
    np.testing.assert_array_equal(coll.video_features("vidA"), expected_video("vidA"))
    with pytest.raises(DataError, match="'vidB_2'"):
        coll.video_features("vidB")
    with pytest.raises(DataError, match="'nope'"):
        coll.video_features("nope")


def test_feature_folder_choice(toy_collection):
    (toy_collection / "FeatureData/resnet").mkdir()
    assert Collection(toy_collection, video_feature="i3d").video_dim == TOY_DIM
    with pytest.raises(DataError, match="'slowfast'.*present: \\['i3d', 'resnet'\\]"):
        Collection(toy_collection, video_feature="slowfast").video_dim
    shutil.rmtree(toy_collection / "FeatureData")
    (toy_collection / "FeatureData").mkdir()
    with pytest.raises(DataError, match="no feature folder"):
        Collection(toy_collection).video_dim


def test_error_lists_at_most_five_ids(toy_collection):
    for k in range(8):
        _append_caption(toy_collection, f"vidGhost{k}#enc#0 nothing here")
    with pytest.raises(DataError) as err:
        Collection(toy_collection).check()
    assert "'vidGhost4'" in str(err.value) and "'vidGhost5'" not in str(err.value)
    assert "(and 3 more)" in str(err.value)


def test_text_feature_file_is_configurable(toy_collection):
    text = toy_collection / "TextData"
    (text / "roberta_toy_query_feat.hdf5").rename(text / "clip_feats.h5")
    assert Collection(toy_collection).check()["text_dim"] is None
    assert Collection(toy_collection, text_feature_file="clip_feats.h5").check()["text_dim"] == TOY_TEXT_DIM


def _main(argv: list[str], monkeypatch) -> int:
    return prvr.cli.main(argv)


def test_cli_check(toy_collection, monkeypatch, capsys):
    assert _main(["data", "check", "--data", str(toy_collection)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "train" in out and "(no caption file)" in out
    assert _main(["data", "check", "--data", str(toy_collection), "--json"], monkeypatch) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["queries"] == 3 and stats["video_dim"] == TOY_DIM
    (toy_collection / FEAT / "shape.txt").write_text("3 3")
    assert _main(["data", "check", "--data", str(toy_collection)], monkeypatch) == 2
    assert "shape.txt" in capsys.readouterr().err


# --------------------------------------------------------------------------- videos.jsonl
def test_video_info_is_read_and_optional(toy_collection):
    assert Collection(toy_collection).video_info == {}
    _write(toy_collection, "videos.jsonl",
           '{"video_id": "vidA", "title": "A kitchen", "duration_s": 12, "url": "https://x.org/a"}\n\n'
           '{"video_id": "vidB"}\n')
    info = Collection(toy_collection).video_info
    assert list(info) == ["vidA", "vidB"]
    assert (info["vidA"].title, info["vidA"].duration_s, info["vidA"].url) == ("A kitchen", 12.0,
                                                                                "https://x.org/a")
    assert (info["vidB"].title, info["vidB"].duration_s, info["vidB"].url) == (None, None, None)
    assert Collection(toy_collection).check()["videos_described"] == 2


@pytest.mark.parametrize("line, needle", [
    ('{"video_id": "vidA", "duration_s": NaN}', "videos.jsonl:1: not a video record (duration_s"),
    ('{"video_id": "vidA", "duration_s": -1}', "duration_s: Input should be greater than 0"),
    ('{"video_id": "vidA", "duration_s": "12"}', "duration_s"),
    ('{"video_id": "vidA", "url": "javascript:alert(1)"}', "url must start with http"),
    ('{"video_id": "vidA", "colour": "red"}', "colour: Extra inputs are not permitted"),
    ('{"video_id": 7}', "video_id: Input should be a valid string"),
    ('{"video_id": "vidA", "title": "' + "t" * 501 + '"}', "title: String should have at most 500"),
    ('["vidA"]', "not a video record"),
    ('{"video_id": "vidA"', "not JSON (JSONDecodeError)"),
    ("[" * 100000, "not JSON (RecursionError)"),
    ('{"video_id": "vidA"}\n{"video_id": "vidA"}', "videos.jsonl:2: video 'vidA' is listed twice"),
    ('{"video_id": "nope"}', "lists videos the features do not hold: 'nope'"),
])
def test_bad_video_info_is_a_clear_data_error(toy_collection, line, needle):
    _write(toy_collection, "videos.jsonl", line + "\n")
    with pytest.raises(DataError) as info:
        Collection(toy_collection).video_info
    assert needle in str(info.value) and len(str(info.value)) < 600, str(info.value)
