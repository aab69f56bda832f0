"""One typed configuration, loaded from params.yaml.

params.yaml is the single source of hyperparameters for the CLI, DVC and the
Kubeflow pipeline. Checkpoints store ``cfg.to_dict()`` (plain types only) so a
model rebuilds from its file alone and loads with ``weights_only=True``.

Usage::

    cfg = load_config("params.yaml", ["train.lr=1e-4", "model.variant=ms-sl"])
"""
from __future__ import annotations

import ast
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config", "DataConfig", "SynthConfig", "TextConfig", "ModelConfig", "TrainConfig",
    "EvalConfig", "SearchConfig", "RegistryConfig", "ServeConfig", "ConfigError",
    "load_config", "default_params_path",
]

REPO_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
VARIANTS = ("ms-sl++", "ms-sl", "mean-pool")


class ConfigError(ValueError):
    """A params file or an override that does not fit the typed config."""


@dataclass
class DataConfig:
    root: str = "data"
    collection: str = "synth"
    video_feature: str | None = None
    text_feature_file: str | None = None


@dataclass
class SynthConfig:
    preset: str = "small"
    seed: int = 2018


@dataclass
class TextConfig:
    encoder: str = "minilm"
    batch_size: int = 128
    max_tokens: int = 30
    precision: str = "float32"


@dataclass
class ModelConfig:
    variant: str = "ms-sl++"
    hidden_size: int = 384
    num_heads: int = 4
    dropout: float = 0.1
    map_size: int = 32
    max_ctx_len: int = 128
    max_desc_len: int = 30
    cluster_num: int = 32
    length_enc_dim: int = 256
    kmedoids_iters: int = 60
    kmedoids_tol: float = 1e-5
    alpha: float = 0.7
    # Input dims are read from the data at training time, never configured by hand.
    video_dim: int = 0
    text_dim: int = 0


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 2.5e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    grad_clip: float = 1.0
    warmup_frac: float = 0.01
    margin: float = 0.2
    hard_negative_start_epoch: int = 20
    hard_pool_size: int = 20
    w_trip_clip: float = 1.0
    w_trip_frame: float = 1.0
    w_nce_clip: float = 0.02
    w_nce_frame: float = 0.04
    patience: int = 10
    seed: int = 2018
    device: str = "auto"
    amp: bool = False
    collapse_cosine: float = 0.99
    collapse_lr_factor: float = 0.2
    max_collapse_restarts: int = 3


@dataclass
class EvalConfig:
    split: str = "test"
    query_chunk: int = 2048
    video_chunk: int = 4096
    mv_bin_width: float = 0.2


ANN_INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq", "ivfpqfs")     # search.index_type (faiss)
REFINE_CODES = re.compile(r"arrays|fp16|sq8|pq[1-9][0-9]*")         # search.refine_codes

# Keys older checkpoints and archives may still carry; read and ignored.
RETIRED_KEYS = frozenset({"search.frame_candidates"})


@dataclass
class SearchConfig:
    backend: str = "exact"
    dtype: str = "float32"
    index_type: str = "ivfpqfs"
    nlist: int = 1024
    nprobe: int = 128
    hnsw_m: int = 32
    ef_search: int = 128
    pq_m: int = 96
    refine: int = 2000
    refine_codes: str = "arrays"
    candidates: int = 50
    milvus_candidates: int = 200
    milvus_uri: str | None = None


@dataclass
class RegistryConfig:
    uri: str = "file://registry"
    endpoint_url: str | None = None
    model_name: str = "prvr-mssl-pp"
    promotion_margin: float = 0.0


@dataclass
class ServeConfig:
    top_k: int = 10
    max_top_k: int = 1000
    max_query_chars: int = 1000
    max_queries: int = 64
    fps: float | None = None
    batch_size: int = 4
    max_batch_delay_ms: int = 1
    threads: int = 2


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (str/int/float/bool/None/list): safe for weights_only checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        for section, values in (d or {}).items():
            if not hasattr(cfg, section):
                raise ConfigError(f"unknown config section {section!r}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            for key, value in values.items():
                if f"{section}.{key}" == "search.refine_pq_m" and "refine_codes" in values:
                    continue                                      # the newer key wins
                if f"{section}.{key}" not in RETIRED_KEYS:
                    _set(cfg, f"{section}.{key}", value)
        cfg.validate()
        return cfg

    def override(self, assignments: list[str] | None) -> "Config":
        """Apply ``section.key=value`` strings (values parsed as Python/YAML literals)."""
        for item in assignments or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            key, raw = item.split("=", 1)
            _set(self, key.strip(), _parse_literal(raw.strip()))
        self.validate()
        return self

    def validate(self) -> None:
        if self.model.variant not in VARIANTS:
            raise ConfigError(f"model.variant must be one of {VARIANTS}, got {self.model.variant!r}")
        if not 0.0 <= self.model.alpha <= 1.0:
            raise ConfigError(f"model.alpha must lie in [0, 1], got {self.model.alpha}")
        if self.model.hidden_size % self.model.num_heads:
            raise ConfigError("model.hidden_size must be divisible by model.num_heads")
        if self.model.variant == "ms-sl++" and self.model.cluster_num > self.num_spans:
            raise ConfigError(f"model.cluster_num ({self.model.cluster_num}) exceeds the "
                              f"{self.num_spans} spans of map_size {self.model.map_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.text.precision not in ("float32", "bfloat16"):
            raise ConfigError(f"text.precision must be float32 or bfloat16, got {self.text.precision!r}")
        if self.search.dtype not in ("float32", "float16"):
            raise ConfigError(f"search.dtype must be float32 or float16, got {self.search.dtype!r}")
        if not REFINE_CODES.fullmatch(str(self.search.refine_codes)):
            raise ConfigError(f"search.refine_codes must be arrays, fp16, sq8 or pq<M> (M bytes per clip), "
                              f"got {self.search.refine_codes!r}")

    @property
    def num_spans(self) -> int:
        m = self.model.map_size
        return m * (m + 1) // 2


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = yaml.safe_load(raw)  # accepts true/false/null/1e-4 and bare strings
        return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    if dotted == "search.refine_pq_m":        # before search.refine_codes: 0 or pq<M>
        dotted, value = "search.refine_codes", f"pq{value}" if value else "arrays"
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key {dotted!r} must be section.key")
    section, key = parts
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub):
        raise ConfigError(f"unknown config section {section!r} (in {dotted!r})")
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"unknown config key {dotted!r}")
    setattr(sub, key, _coerce(value, hints[key], dotted))


def default_params_path() -> Path | None:
    """./params.yaml when there is one (a DVC project), else the repository's, else none."""
    for candidate in (Path("params.yaml"), REPO_PARAMS):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read params.yaml (default: ./params.yaml, else the repository's) and apply overrides.

    Without any params file the dataclass defaults (the paper's values) apply."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"params file not found: {path}")
    path = Path(path) if path is not None else default_params_path()
    if path is None:
        cfg = Config()
    else:
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
        cfg = Config.from_dict(raw)
    return cfg.override(overrides)
