"""One typed configuration: values in params.yaml, types and bounds here.

Why it is built this way:

* **One home for values.** Every default lives in ``prvr/params.yaml`` (shipped with the
  package; the repository's ``./params.yaml`` links to it, for DVC). The classes below
  declare no defaults, so a value can never drift between the YAML and the code.
* **Typed at the edge.** The sections are pydantic models with bounds and cross-field
  checks; a wrong value fails when it is read or assigned, with one line that names the
  key and the value (``train.lr must be > 0, got -1``), never deep inside training.
* **Layers of the loader**, each over the one before: the packaged ``prvr/params.yaml``
  -> the user's params file (``--params``, else ``./params.yaml``; it may set only some
  keys) -> environment variables ``PRVR_<SECTION>__<KEY>=value`` -> ``--set section.key=value``.

Checkpoints store ``cfg.to_dict()`` (plain types only, loads with ``weights_only=True``);
``Config.from_dict`` reads it back over the packaged values, so older files keep loading.

Usage::

    cfg = load_config("params.yaml", ["train.lr=1e-4", "model.variant=ms-sl"])
"""
from __future__ import annotations

import ast
import copy
import functools
import importlib.resources
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "Config", "DataConfig", "SynthConfig", "TextConfig", "ModelConfig", "TrainConfig",
    "EvalConfig", "SearchConfig", "RegistryConfig", "ServeConfig", "ConfigError",
    "load_config", "default_config", "default_params_path",
    "ANN_INDEX_TYPES", "REFINE_CODES", "RETIRED_KEYS", "VARIANTS", "PACKAGED_PARAMS", "ENV_PREFIX",
]

PACKAGED_PARAMS = Path(__file__).resolve().with_name("params.yaml")
ENV_PREFIX = "PRVR_"           # PRVR_<SECTION>__<KEY>=value; single-underscore PRVR_* names are not config

Variant = Literal["ms-sl++", "ms-sl", "mean-pool"]
IndexType = Literal["flat", "ivf", "hnsw", "ivfpq", "ivfpqfs"]       # search.index_type (faiss)
VARIANTS: tuple[str, ...] = get_args(Variant)
ANN_INDEX_TYPES: tuple[str, ...] = get_args(IndexType)
REFINE_CODES = re.compile(r"arrays|fp16|sq[468]|rabitq[1-9]|pq[1-9][0-9]*")   # search.refine_codes

# Keys older checkpoints, archives and params files may still carry: read and dropped.
RETIRED_KEYS = frozenset({"search.frame_candidates", "text.max_tokens"})
# search.refine_pq_m (M, or 0) became search.refine_codes (pqM, or arrays).
_LEGACY_REFINE_PQ_M = "search.refine_pq_m"


class ConfigError(ValueError):
    """A params file, an override or an assignment that does not fit the typed config."""


# --------------------------------------------------------------------------- #
# Field types: no silent bool -> number, no float truncated to an int
# --------------------------------------------------------------------------- #
def _int(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, numbers.Integral):         # numpy integers too
        return int(value)
    return value                                    # 2.0 passes, 1.5 and 'x' fail (int_from_float, int_parsing)


def _float(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    if isinstance(value, numbers.Real):             # numpy floats too
        return float(value)
    return value                                    # '1e-4' (YAML 1.1 reads it as a string) passes


def _bool(value: Any) -> Any:
    if isinstance(value, (bool, str)):              # 'true' / 'false' strings parse; numbers do not
        return value
    raise PydanticCustomError("bool_type", "Input should be a valid boolean")


Int = Annotated[int, BeforeValidator(_int)]
Float = Annotated[float, BeforeValidator(_float)]
Bool = Annotated[bool, BeforeValidator(_bool)]
PosInt = Annotated[Int, Field(ge=1)]
Count = Annotated[Int, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
Text = Annotated[str, Field(min_length=1)]

_DEVICE = r"^(?:auto|cpu|cuda(?::[0-9]+)?)$"
_REFINE = rf"^(?:{REFINE_CODES.pattern})$"
_REGISTRY_URI = r"^(?:(?:file|s3)://.+|[^:]+)$"           # registry.Registry accepts these
_CHECKPOINT_URI = r"^(?:s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](?:/.*)?|/.*)$"   # train.checkpoint_uri
_PATTERN_HINTS = {                                  # what a pattern means, for error messages
    _DEVICE: "auto, cpu, cuda or cuda:N",
    _REFINE: "arrays, fp16, sq8, sq6, sq4, rabitq<b> (1 <= b <= 9 bits per dim) or pq<M> (M >= 1 bytes per clip)",
    _REGISTRY_URI: "file://PATH, s3://BUCKET/PREFIX or a folder path",
    _CHECKPOINT_URI: "s3://BUCKET/PREFIX or an absolute folder path",
}


class _Section(BaseModel):
    """A config section: every field required (values come from params.yaml), extra keys
    refused, assignments validated (and rolled back when they fail, as ConfigError).
    Build one with ``default_config()`` / ``load_config()`` and ``replace()``, not by hand."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              coerce_numbers_to_str=True)
    section: ClassVar[str] = ""                     # its name in params.yaml

    @classmethod
    def _prefix(cls) -> tuple[str, ...]:
        return (cls.section,) if cls.section else ()

    @classmethod
    def _validated(cls, values: Any, sources: Mapping[str, str] | None = None):
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, cls._prefix(), sources)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):                    # pydantic's own attributes
            return super().__setattr__(name, value)
        if name not in type(self).model_fields:
            raise ConfigError(_unknown(self._prefix(), name))
        old = self.__dict__[name]
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            self.__dict__[name] = old               # a failed cross-field check must not stick
            raise ConfigError(_describe(exc, self._prefix())) from None

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied together (cross-field checks see them all)."""
        return self._validated({**self.model_dump(), **changes})


class DataConfig(_Section):
    section: ClassVar[str] = "data"
    root: Text
    collection: Text
    video_feature: Text | None
    text_feature_file: Text | None


class SynthConfig(_Section):
    section: ClassVar[str] = "synth"
    preset: Literal["tiny", "small", "tvr-like", "hard"]
    seed: Count


class TextConfig(_Section):
    section: ClassVar[str] = "text"
    encoder: Text
    batch_size: PosInt
    precision: Literal["float32", "bfloat16"]
    source: Literal["auto", "hdf5", "encoder"]
    runtime: Literal["torch", "onnx"]
    quantize: Literal["none", "int8"]

    @model_validator(mode="after")
    def _runnable(self) -> "TextConfig":
        if self.precision != "float32" and self.quantize != "none":
            raise ValueError(f"text.quantize {self.quantize!r} quantizes the float32 encoder: set "
                             f"text.precision float32, or text.quantize none to keep {self.precision}")
        return self


class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    variant: Variant
    hidden_size: PosInt
    num_heads: PosInt
    dropout: Annotated[Float, Field(ge=0, lt=1)]
    map_size: PosInt
    max_ctx_len: PosInt
    max_desc_len: Annotated[Int, Field(ge=2)]     # room for the special tokens
    cluster_num: PosInt
    length_enc_dim: Annotated[Int, Field(ge=2, multiple_of=2)]   # sin/cos pairs
    kmedoids_iters: PosInt
    kmedoids_tol: NonNegFloat
    alpha: Fraction
    video_dim: Count                                # read from the data at training time (0 until then)
    text_dim: Count

    @property
    def num_spans(self) -> int:
        return self.map_size * (self.map_size + 1) // 2

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size must be divisible by model.num_heads, "
                             f"got {self.hidden_size} and {self.num_heads}")
        if self.variant == "ms-sl++" and self.cluster_num > self.num_spans:
            raise ValueError(f"model.cluster_num must be <= {self.num_spans} (the spans of map_size "
                             f"{self.map_size}) for ms-sl++, got {self.cluster_num}")
        return self


class TrainConfig(_Section):
    section: ClassVar[str] = "train"
    epochs: PosInt
    batch_size: PosInt
    lr: PosFloat
    weight_decay: NonNegFloat
    betas: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
    eps: PosFloat
    grad_clip: PosFloat
    warmup_frac: Fraction
    margin: NonNegFloat
    hard_negative_start_epoch: Count
    hard_pool_size: PosInt
    w_trip_clip: NonNegFloat
    w_trip_frame: NonNegFloat
    w_nce_clip: NonNegFloat
    w_nce_frame: NonNegFloat
    patience: PosInt
    seed: Count
    device: Annotated[str, Field(pattern=_DEVICE)]
    amp: Bool
    collapse_cosine: Annotated[Float, Field(ge=-1, le=1)]
    collapse_lr_factor: Annotated[Float, Field(gt=0, le=1)]
    max_collapse_restarts: Count
    checkpoint_uri: Annotated[str, Field(pattern=_CHECKPOINT_URI)] | None


class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    split: Literal["train", "val", "test"]
    query_chunk: PosInt
    video_chunk: PosInt
    mv_bin_width: Annotated[Float, Field(gt=0, le=1)]


class SearchConfig(_Section):
    section: ClassVar[str] = "search"
    backend: Literal["exact", "faiss", "milvus"]
    screen: Literal["int8", "bf16", "fp32"]     # the exact engine's screen (prvr.search.screen)
    fused_screen: Bool              # exact int8: + the fused vectors' screen (FusedScreen)
    screen_threads: Count           # exact int8: ONNX Runtime threads of the screens (0: torch's)
    dtype: Literal["float32", "float16"]
    index_type: IndexType
    nlist: PosInt
    nprobe: PosInt
    hnsw_m: Annotated[Int, Field(ge=2)]
    ef_search: PosInt
    pq_m: PosInt
    refine: PosInt
    refine_codes: Annotated[str, Field(pattern=_REFINE)]
    read_ahead: Bool                # faiss: read the candidates' rows of memory-mapped arrays ahead, at once
    candidates: PosInt
    milvus_candidates: PosInt
    milvus_uri: Text | None


class RegistryConfig(_Section):
    section: ClassVar[str] = "registry"
    uri: Annotated[str, Field(pattern=_REGISTRY_URI)]
    endpoint_url: Text | None
    model_name: Text
    promotion_margin: NonNegFloat
    max_attempts: PosInt
    retry_mode: Literal["standard", "adaptive"]
    multipart_threshold_mb: Annotated[Int, Field(ge=1, le=5120)]       # MiB; 5120 = S3's single-PUT cap
    multipart_chunk_mb: Annotated[Int, Field(ge=5, le=5120)]           # MiB; S3's part size bounds
    max_concurrency: PosInt


class ServeConfig(_Section):
    section: ClassVar[str] = "serve"
    top_k: PosInt
    max_top_k: PosInt
    max_query_chars: PosInt
    max_queries: PosInt
    max_body_bytes: Annotated[Int, Field(ge=1, le=2**31 - 1)]   # bytes; TorchServe's limit is a Java int
    fps: PosFloat | None
    batch_size: PosInt
    max_batch_delay_ms: Count
    threads: PosInt
    text_threads: PosInt                            # ONNX Runtime threads of the text encoder
    corpus: Text                                    # all | a split | a file of video ids
    client_timeout_ms: Count                        # TorchServe clientTimeoutInMills; 0 = none

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.top_k > self.max_top_k:
            raise ValueError(f"serve.top_k must be <= serve.max_top_k ({self.max_top_k}), got {self.top_k}")
        if self.batch_size > 1 and self.max_batch_delay_ms == 0:     # measured: every lone request +100 ms
            raise ValueError("serve.max_batch_delay_ms must be >= 1 when serve.batch_size > 1: TorchServe 0.12 "
                             "takes 0 as its own default delay of 100 ms for every batch")
        return self


class Config(_Section):
    """All sections; ``load_config`` / ``default_config`` / ``Config.from_dict`` build one."""

    data: DataConfig
    synth: SynthConfig
    text: TextConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    search: SearchConfig
    registry: RegistryConfig
    serve: ServeConfig

    @property
    def num_spans(self) -> int:
        return self.model.num_spans

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (str/int/float/bool/None/list): safe for weights_only checkpoints."""
        return self.model_dump(mode="python")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Config":
        """``d`` (a whole or partial config, e.g. an older checkpoint's) over the packaged values.

        Retired keys are dropped and ``search.refine_pq_m`` becomes ``search.refine_codes``."""
        values = _packaged_copy()
        _merge(values, _upgrade(d))
        return cls._validated(values)

    def override(self, assignments: Iterable[str] | None) -> "Config":
        """Apply ``section.key=value`` strings (values parsed as Python/YAML literals), in order,
        and validate them together. Changes this config in place and returns it."""
        values = self.to_dict()
        for section, key, value in _parse_assignments(assignments):
            _assign(values, section, key, value)
        self._adopt(self._validated(values))
        return self

    def _adopt(self, other: "Config") -> None:
        """Take ``other``'s (validated) values into this config's own section objects."""
        for name in type(self).model_fields:
            getattr(self, name).__dict__.update(getattr(other, name).__dict__)


# --------------------------------------------------------------------------- #
# Loader
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=1)
def _packaged_values() -> dict[str, Any]:
    text = importlib.resources.files(__package__ or "prvr").joinpath("params.yaml").read_text(encoding="utf-8")
    values = _parse_yaml(text, "the packaged prvr/params.yaml")
    if not isinstance(values, dict):
        raise ConfigError(f"the packaged prvr/params.yaml must hold a mapping of sections, got {values!r}")
    return values


def _packaged_copy() -> dict[str, Any]:
    return copy.deepcopy(_packaged_values())


def default_config() -> Config:
    """A fresh, validated Config holding the packaged prvr/params.yaml values."""
    return Config._validated(_packaged_copy())


def default_params_path() -> Path:
    """The params file a run without ``--params`` reads over the packaged values:
    ./params.yaml when there is one (a DVC project), else the packaged prvr/params.yaml."""
    return _cwd_params() or PACKAGED_PARAMS


def load_config(path: str | Path | None = None, overrides: Iterable[str] | None = None) -> Config:
    """The config of a run: packaged prvr/params.yaml <- ``path`` (default ./params.yaml when
    there is one) <- ``PRVR_<SECTION>__<KEY>`` environment variables <- ``overrides``."""
    values = _packaged_copy()
    sources: dict[str, str] = {}
    if path is not None:
        user: Path | None = Path(path)
        if not user.is_file():
            raise ConfigError(f"params file not found: {path}")
    else:
        user = _cwd_params()
    if user is not None:
        _merge(values, _upgrade(_read_yaml(user), user), sources, f"in {user}")
    for section, key, value, var in _env_assignments(os.environ):
        sources[f"{section}.{_assign(values, section, key, value)}"] = f"from {var}"
    for section, key, value in _parse_assignments(overrides):
        sources.pop(f"{section}.{_assign(values, section, key, value)}", None)
    return Config._validated(values, sources)


def _cwd_params() -> Path | None:
    """./params.yaml, unless it is missing or is the packaged file itself (the repo's symlink)."""
    here = Path("params.yaml")
    if not here.is_file():
        return None
    try:
        if here.resolve() == PACKAGED_PARAMS or os.path.samefile(here, PACKAGED_PARAMS):
            return None
    except OSError:
        pass
    return here


def _read_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror or exc}") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, name: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{name} is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None


def _upgrade(d: Any, path: Path | None = None) -> dict[str, dict[str, Any]]:
    """A layer (a config dict, or the params file at ``path``) as {section: {key: value}}:
    retired keys dropped, legacy keys translated."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path or 'a config'} must hold a mapping of sections, got {_show(d)}")
    out: dict[str, dict[str, Any]] = {}
    for section, values in d.items():
        if values is None:                          # a section whose keys are all commented out
            values = {}
        if not isinstance(values, Mapping):
            where = f" (in {path})" if path else ""
            raise ConfigError(f"config section {section!r} must be a mapping, got {_show(values)}{where}")
        values = {k: v for k, v in values.items() if f"{section}.{k}" not in RETIRED_KEYS}
        if section == "search" and "refine_pq_m" in values:
            pq_m = values.pop("refine_pq_m")
            if "refine_codes" not in values:        # the newer key wins
                values["refine_codes"] = _refine_codes(pq_m)
        out[section] = values
    return out


def _refine_codes(pq_m: Any) -> str:
    """Legacy search.refine_pq_m -> search.refine_codes: 0 -> arrays, M -> pqM."""
    if isinstance(pq_m, bool) or not isinstance(pq_m, numbers.Real) or pq_m < 0 or pq_m != int(pq_m):
        raise ConfigError(f"{_LEGACY_REFINE_PQ_M} must be an integer >= 0, got {_show(pq_m)}")
    return f"pq{int(pq_m)}" if pq_m else "arrays"


def _merge(values: dict[str, Any], layer: Mapping[str, Mapping[str, Any]],
           sources: dict[str, str] | None = None, origin: str = "") -> None:
    """Deep-merge ``layer`` (sections of keys) over ``values``; unknown names stay for the
    schema to refuse."""
    for section, keys in layer.items():
        target = values.get(section)
        if isinstance(target, dict):
            target.update(keys)
        else:
            values[section] = dict(keys)
        if sources is not None:
            sources.update({f"{section}.{key}": origin for key in keys})


def _assign(values: dict[str, Any], section: str, key: str, value: Any) -> str:
    """One checked ``section.key = value`` into ``values``; returns the key it set."""
    if f"{section}.{key}" == _LEGACY_REFINE_PQ_M:
        key, value = "refine_codes", _refine_codes(value)
    values[section][key] = value
    return key


def _parse_value(raw: str) -> Any:
    """A --set or environment value: a Python literal, else YAML (true, null, 1e-4, bare words)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _check_key(section: str, key: str, dotted: str, where: str = "") -> None:
    """``dotted`` (as written) names a key of the schema, or a legacy key ``_assign`` translates."""
    fields = Config.model_fields
    if not section or not key or "." in key:
        raise ConfigError(f"config key {dotted!r} must be section.key{where}")
    if section not in fields:
        raise ConfigError(f"unknown config key {dotted!r} (no section {section!r}){where}")
    if dotted == _LEGACY_REFINE_PQ_M:
        return
    if key not in fields[section].annotation.model_fields:
        retired = ", a retired key" if dotted in RETIRED_KEYS else ""
        raise ConfigError(f"unknown config key {dotted!r}{retired}{where}")


def _parse_assignments(items: Iterable[str] | None) -> list[tuple[str, str, Any]]:
    if isinstance(items, str):
        items = [items]
    out = []
    for item in items or []:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = (part.strip() for part in item.split("=", 1))
        section, _, key = dotted.partition(".")
        _check_key(section, key, dotted)
        out.append((section, key, _parse_value(raw)))
    return out


def _env_assignments(environ: Mapping[str, str]) -> list[tuple[str, str, Any, str]]:
    """PRVR_<SECTION>__<KEY>=value variables (PRVR_TORCH_THREADS and the like are not config)."""
    out = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or "__" not in var[len(ENV_PREFIX):]:
            continue
        section, _, key = var[len(ENV_PREFIX):].lower().partition("__")
        _check_key(section, key, f"{section}.{key}", f" (environment variable {var})")
        out.append((section, key, _parse_value(environ[var]), var))
    return out


# --------------------------------------------------------------------------- #
# Error messages: one line per problem, naming the key and the value
# --------------------------------------------------------------------------- #
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unknown(prefix: tuple[str, ...], name: str) -> str:
    if prefix:
        return f"unknown config key {_dotted((*prefix, name))!r}"
    return f"unknown config section {name!r}"


# pydantic error type -> the end of our one-line message ({key} and {got} are filled in, with
# the error's context: gt, ge, lt, le, multiple_of, min_length, max_length)
_MESSAGES = {
    "missing": "{key} is missing",
    "greater_than": "{key} must be > {gt}, got {got}",
    "greater_than_equal": "{key} must be >= {ge}, got {got}",
    "less_than": "{key} must be < {lt}, got {got}",
    "less_than_equal": "{key} must be <= {le}, got {got}",
    "multiple_of": "{key} must be a multiple of {multiple_of}, got {got}",
    "finite_number": "{key} must be a finite number, got {got}",
    "string_type": "{key} must be a string, got {got}",
    "string_too_short": "{key} must not be empty, got {got}",
    "too_short": "{key} must hold at least {min_length} values, got {got}",
    "too_long": "{key} must hold at most {max_length} values, got {got}",
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float", "int_parsing_size"),
                    "{key} must be an integer, got {got}"),
    **dict.fromkeys(("float_type", "float_parsing"), "{key} must be a number, got {got}"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "{key} must be true or false, got {got}"),
    **dict.fromkeys(("list_type", "tuple_type"), "{key} must be a list, got {got}"),
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"),
                    "{key} must be a mapping of keys, got {got}"),
}


def _message(err: Mapping[str, Any], loc: tuple, key: str, got: str) -> str:
    """One line for one pydantic error, naming the key and the value."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])                    # our cross-field checks name their keys
    if kind in ("extra_forbidden", "no_such_attribute"):
        return _unknown(tuple(loc[:-1]), str(loc[-1]))
    if kind == "literal_error":
        return f"{key} must be one of {str(ctx['expected']).replace(' or ', ', ')}, got {got}"
    if kind == "string_pattern_mismatch":
        hint = _PATTERN_HINTS.get(ctx.get("pattern"), f"a match of {ctx.get('pattern')}")
        return f"{key} must be {hint}, got {got}"
    if kind in ("too_short", "too_long") and ctx.get("min_length", -1) == ctx.get("max_length", -2):
        return f"{key} must hold {ctx['min_length']} values, got {got}"
    if kind in _MESSAGES:
        return _MESSAGES[kind].format(key=key or "config", got=got, **ctx)
    return f"{key}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {got}"


def _describe(exc: ValidationError, prefix: tuple[str, ...] = (),
              sources: Mapping[str, str] | None = None) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        line = _message(err, loc, _dotted(loc), _show(err.get("input")))
        source = (sources or {}).get(_dotted(loc[:2]))
        lines.append(f"{line} ({source})" if source else line)
    return "\n".join(dict.fromkeys(lines))
