"""Loading the typed config tree: `pipeline.yaml`, then `--config` files, then `key.sub=value` overrides.

Every section is a `Section` (a pydantic model with `extra="forbid"`). Stage sections live beside
their stage (`stages/<stage>: Config`) and `stages/__init__.py` composes the tree (`PipelineConfig`);
this module holds the sections every stage shares (data, tracking, Ray) and the loading machinery.
`load_config` collects every problem (unknown keys, wrong types, out-of-range values) and raises one
`ConfigError` listing them all, each naming the key, the bad value and what is valid, before anything
touches Ray or MLflow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import shapes as dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "pipeline.yaml"


class ConfigError(ValueError):
    """Every problem found in the config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    """The base of every config section: unknown keys are errors, defaults are validated too.
    `NOT_IN_FINGERPRINT` names the keys that change how a stage runs but not what it produces
    (counts of actors, logging cadence, where checkpoints go); `pipeline.graph` leaves them out.
    `FORMER_KEYS` maps a block that replaced flat keys to them ({block: {key in block: former key}}):
    the fingerprint sees the former keys, so the move changes no fingerprint."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ()
    FORMER_KEYS: ClassVar[dict[str, dict[str, str]]] = {}


class TrackingConfig(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under the workdir
    experiment: str = Field("swd-embedded", min_length=1)
    connect_timeout_s: float = Field(20.0, gt=0, le=30)


class RayConfig(Section):
    address: str | None = None  # None: $RAY_ADDRESS (set by `ray job submit`), else start a local Ray
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory_gib: float | None = Field(None, gt=0)


class GeneratorConfig(Section):
    seed: int = 0
    num_train_samples: int = Field(4096, ge=1)
    num_eval_samples: int = Field(256, ge=1)
    samples_per_shard: int = Field(512, ge=1)
    image_side_px: int = Field(64, ge=16, le=1024)
    shapes: list[str] = list(dataset.SHAPES)
    colours: list[str] = list(dataset.COLOURS_RGB)
    sizes: list[str] = list(dataset.SIZES_CELL_FRACTION)
    backgrounds: list[str] = list(dataset.BACKGROUNDS_RGB)

    @field_validator("image_side_px")
    @classmethod
    def _divisible(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"{v} must be a multiple of 16 (the VAE downsamples by 4 and SwD scales need room)")
        return v

    @field_validator("shapes", "colours", "sizes", "backgrounds")
    @classmethod
    def _known(cls, v: list[str], info) -> list[str]:
        known = {
            "shapes": dataset.SHAPES,
            "colours": tuple(dataset.COLOURS_RGB),
            "sizes": tuple(dataset.SIZES_CELL_FRACTION),
            "backgrounds": tuple(dataset.BACKGROUNDS_RGB),
        }[info.field_name]
        unknown = [x for x in v if x not in known]
        if unknown or not v:
            raise ValueError(f"{v} must be a non-empty list drawn from {list(known)}")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} has duplicates")
        return v


class DataConfig(Section):
    # Local paths, globs, brace patterns ({000..009}) or pyarrow-filesystem URIs (s3://...).
    train_shards: str | list[str] | None = None
    eval_shards: str | list[str] | None = None
    # A prompt file for teacher-generated training images (the `synthesize` stage): .txt (one per
    # line), .parquet or .csv (column `prompt_column`); local path or pyarrow-filesystem URI.
    prompts: str | None = None
    prompt_column: str = Field("prompt", min_length=1)
    generator: GeneratorConfig = GeneratorConfig()

    @field_validator("prompts")
    @classmethod
    def _prompt_file(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty string; give a prompt file (.txt, .parquet, .csv) or null")
        return v


# ----------------------------------------------------------------------------- miniature overlays

# A config file named `miniature.yaml` (cluster/miniature.yaml) shrinks a cluster profile to a
# laptop / CI run of the same settings. It may set only these size and hardware keys (a trailing `*`
# covers a whole section), so the miniature cannot drift from the profile it stands for: ZeRO stage,
# gradient checkpointing, early exit, MMD features, loss weights and ranges, fake updates per step,
# LoRA targets and rank, CFG and the number of scales all stay the profile's.
MINIATURE_FILE_NAME = "miniature.yaml"


def miniature_problems(layer: dict, path: Path, miniature_keys: tuple[str, ...]) -> list[str]:
    """Every key of a miniature overlay outside `miniature_keys` (the tree's MINIATURE_KEYS), one line each."""
    def allowed(key: str) -> bool:
        return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in miniature_keys)

    return [f"{key}: a miniature overlay ({path}) may set only size and hardware keys, and {key} is not one; "
            f"remove it from {path.name} (valid: {', '.join(miniature_keys)})"
            for key in flatten(layer) if not allowed(key)]


def renamed_key_problems(layer: dict, path: Path | None, renamed: dict[str, str]) -> list[str]:
    """A key the tree renamed (`renamed`: old dotted key -> new one), one line each naming the new key."""
    where = f" ({path})" if path else ""
    return [f"{key}: renamed to {renamed[key]}{where}; set {renamed[key]} instead"
            for key in flatten(layer) if key in renamed]


# ----------------------------------------------------------------------------- loading


def load_config(tree: type[BaseModel], config_files: list[str | Path] = (), overrides: list[str] = (),
                base: str | Path | None = DEFAULT_CONFIG) -> BaseModel:
    """pipeline.yaml, then each `--config` file, then `key.sub=value` overrides, validated once as
    `tree` (`stages.PipelineConfig`; `stages.load_config` binds it)."""
    problems: list[str] = []
    merged: dict[str, Any] = {}
    for path in ([base] if base else []) + list(config_files):
        try:
            layer = _read_yaml(Path(path))
        except ConfigError as e:
            problems += e.problems
            continue
        problems += renamed_key_problems(layer, Path(path), getattr(tree, "RENAMED_KEYS", {}))
        if Path(path).name == MINIATURE_FILE_NAME:
            problems += miniature_problems(layer, Path(path), getattr(tree, "MINIATURE_KEYS", ()))
        merged = _deep_merge(merged, layer)
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            problems += e.problems
            continue
        problems += renamed_key_problems({key: value}, None, getattr(tree, "RENAMED_KEYS", {}))
        _set_dotted(merged, key, value)
    if problems:
        raise ConfigError(problems)
    return validate(tree, merged)


def validate(tree: type[BaseModel], raw: dict[str, Any]) -> BaseModel:
    try:
        cfg = tree.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe_all(tree, e.errors())) from None
    # Relative workdirs are relative to where the user runs the command, like any CLI path.
    cfg.workdir = Path(os.path.abspath(cfg.workdir))
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`distill.num_steps=10` -> ("distill.num_steps", 10); values are YAML (numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r}: expected key.sub=value (e.g. distill.num_steps=10)"])
    try:
        value = yaml.safe_load(text) if text.strip() else ""
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string; a CLI user means the number
            if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
                value = float(value)
    except yaml.YAMLError as e:
        raise ConfigError([f"override {item!r}: value is not valid YAML ({e.problem})"]) from None
    return key, value


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (for MLflow params and --dry-run)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, (dict, BaseModel)) else {key: v})
    return out


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}"])
    return data


def _deep_merge(base: dict, layer: dict) -> dict:
    out = dict(base)
    for k, v in layer.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _describe_all(tree: type[BaseModel], errors: list[dict]) -> list[str]:
    """pydantic errors -> one 'key: bad value is invalid: what is valid' line per key."""
    by_key: dict[str, list[dict]] = {}
    for err in errors:
        by_key.setdefault(".".join(_field_path(tree, err)) or "(top level)", []).append(err)
    lines = []
    for key, errs in by_key.items():
        if errs[0]["type"] == "extra_forbidden":
            valid = sorted(_fields_at(tree, key.split(".")[:-1]))
            lines.append(f"{key}: unknown key; valid keys here: {', '.join(valid)}")
            continue
        # A union (e.g. str | list[str]) reports one error per member: say them as alternatives.
        msgs = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errs))
        if all(_SELF_DESCRIBING.match(m) for m in msgs):  # a section validator already named the key
            lines += [line for m in msgs for line in m.splitlines()]
            continue
        lines.append(f"{key}: {errs[0].get('input')!r} is invalid: {' or '.join(msgs)}")
    return lines


_SELF_DESCRIBING = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+: ")


def _field_path(tree: type[BaseModel], err: dict) -> list[str]:
    """The config key of an error: field names and list indexes, without pydantic's
    union-member tags ('str', 'list[str]') and validator tags."""
    path: list[str] = []
    model: type[BaseModel] | None = tree
    loc = err["loc"]
    for i, part in enumerate(loc):
        unknown_key = err["type"] == "extra_forbidden" and i == len(loc) - 1
        if isinstance(part, int) or unknown_key or (model and part in model.model_fields):
            path.append(str(part))
            ann = getattr(model.model_fields.get(part), "annotation", None) if model and isinstance(part, str) else None
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return path


def _fields_at(tree: type[BaseModel], loc: list[str]) -> list[str]:
    model: type[BaseModel] = tree
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)
