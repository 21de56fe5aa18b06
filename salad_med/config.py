"""Typed, validated configuration loaded from YAML with ``section.key=value`` overrides.

A config is a tree of dataclasses (:class:`Config`). Every field may carry validation metadata
(``choices``, ``min``, ``max``) through :func:`_field`. Loading rejects unknown keys, wrong types and
out-of-range values with a :class:`~salad_med.errors.ConfigError` naming the key and the file.

Example:
    >>> cfg = load_config("configs/demo.yaml", overrides=["train.lr=1e-3"])
    >>> cfg.train.lr
    0.001
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preprocessing.atomic import atomic_write_text
from salad_med.errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "PreprocessConfig",
    "SplitConfig",
    "ModelConfig",
    "TrainConfig",
    "ScoreConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "apply_overrides",
    "config_field",
    "CONFIG_DIR",
]

#: Directory of the shipped YAML configs (``configs/`` at the repository root).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_field(default: Any, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, help: str = "", exclusive_min: bool = False) -> Any:
    """A dataclass field with validation metadata (``choices``, ``min``/``max`` inclusive unless
    ``exclusive_min``)."""
    meta = {"choices": choices, "min": min, "max": max, "help": help, "exclusive_min": exclusive_min}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


_field = config_field


@dataclass
class DataConfig:
    """Where images come from and how the trainer sees them."""

    dataset: str = _field("mura", choices=("mura", "nih", "folder", "dicom"), help="pipeline / layout name")
    image_size: int = _field(512, min=16, max=4096, help="network input side (pixels)")
    cache_dir: str = _field("", help="uint8/uint16 memmap cache directory ('' = <run>/cache)")
    num_workers: int = _field(0, min=0, max=64, help="DataLoader worker processes")
    skip_missing: bool = _field(False, help="record and skip missing/unreadable manifest files")
    augment: bool = _field(True, help="random augmented views for the sample-specific loss")
    augmentation: str = _field("default", choices=("default", "flip"),
                               help="views: default (flip, rotation +-10 deg, scale +-10 %, intensity) or flip "
                                    "(horizontal flip only, the official code)")
    allow_resize: bool = _field(False,
                                help="resample preprocessed images whose size differs from data.image_size")


@dataclass
class PreprocessConfig:
    """Reader and transform options of ``salad-med preprocess`` (one pipeline for all commands)."""

    size: int = _field(512, min=16, max=4096, help="output side after resize-longest + pad")
    bit_depth: int = _field(8, choices=(8, 16), help="bit depth of written PNGs")
    workers: int = _field(1, min=1, max=256, help="parallel worker processes")
    reader: str = _field("auto", choices=("auto", "pydicom", "sitk", "pil"), help="image reader")
    apply_voi: bool = _field(True, help="apply VOI LUT / first window of DICOM files")
    low_percentile: float = _field(1.0, min=0.0, max=50.0, help="intensity window low percentile")
    high_percentile: float = _field(99.0, min=50.0, max=100.0, help="intensity window high percentile")
    fix_polarity: bool = _field(True, help="invert PNG/JPEG whose background is bright")
    detect_carrier: bool = _field(True, help="find and crop the X-ray carrier")
    segment: bool = _field(True, help="hysteresis body-part segmentation")
    apply_mask: bool = _field(False, help="multiply the output image by the body-part mask")
    exact_jpeg: bool = _field(False, help="decode every scan of progressive JPEGs (default: only the first "
                              "scans a 1/4-1/8 scale read needs, ~3x faster, within ~0.5 grey levels)")


@dataclass
class SplitConfig:
    """Patient x body-part split parameters (``salad-med split``)."""

    anomalous_ratio: float = _field(0.05, min=0.0, max=0.9, help="abnormal fraction of train groups (AR)")
    train_fraction: float = _field(0.5, min=0.01, max=0.99, help="fraction of all groups put in train")
    group: str = _field("patient_bodypart", choices=("patient_bodypart", "patient"), help="grouping")


@dataclass
class ModelConfig:
    """Network architecture (``salad_med.nets``)."""

    arch: str = _field("resnet18", choices=("conv6", "resnet18"), help="conv6 (chest) or resnet18 (MURA)")
    latent_dim: int = _field(200, min=2, max=4096, help="embedding size (paper: 200)")
    base_channels: int = _field(32, min=4, max=512, help="channels of the first conv block")
    stem_stride: int = _field(2, choices=(1, 2), help="ResNet stem stride")
    norm: str = _field("batch", choices=("batch", "group", "instance", "none"),
                       help="normalisation layers: batch (paper), group/instance/none do not depend on the "
                            "batch composition (a DDP run then equals a 1-process run exactly)")
    init_from: str = _field("", help="run directory (e.g. `salad-med pretrain --method simclr`) whose encoder "
                                     "weights initialise this network's encoder before training; '' (default) = "
                                     "random initialisation, exactly as without this key")


@dataclass
class TrainConfig:
    """SALAD trainer hyper-parameters (paper defaults; official-code deviations are switches)."""

    method: str = _field("salad", help="registered method (salad-med config show --methods lists them)")
    batch_size: int = _field(16, min=1, max=4096,
                             help="GLOBAL batch per step (paper: 16); under torchrun each of the W ranks "
                                  "takes batch_size / W (must divide)")
    lr: float = _field(1e-4, min=0.0, max=1.0, exclusive_min=True, help="Adam learning rate (paper: 1e-4)")
    beta1: float = _field(0.5, min=0.0, max=1.0, help="Adam beta1 (paper: 0.5; official code: 0.9)")
    beta2: float = _field(0.999, min=0.0, max=1.0, help="Adam beta2")
    weight_decay: float = _field(0.0, min=0.0, max=1.0, help="Adam weight decay (official code: 1e-6)")
    pretrain_epochs: int = _field(50, min=0, max=10000, help="E0: epochs of L_rec + lambda L_ss")
    rounds: int = _field(10, min=0, max=1000, help="R: progressive rounds adding L_agg")
    epochs_per_round: int = _field(50, min=1, max=10000, help="E: epochs per round")
    tau: float = _field(0.1, min=1e-4, max=10.0, help="softmax temperature")
    lam: float = _field(0.25, min=0.0, max=100.0, help="lambda weighting L_ss + L_agg")
    bank_momentum: float = _field(0.5, min=0.0, max=1.0, help="t in m <- norm((1-t) m + t z)")
    k: int = _field(100, min=1, max=100000, help="neighbourhood size K of the last round (k_r = round(K r / R): "
                                                 "our reading of the paper's progressive widening)")
    rec_loss: str = _field("mse", choices=("mse", "l1"), help="mse (paper) or l1 (official code)")
    rec_reduction: str = _field("sum", choices=("mean", "sum"),
                                help="L_rec over an image's pixels: sum (the paper's ||x - x_hat||^2, default) or "
                                     "mean (official code); mean weighs L_rec S^2 times less against lambda")
    schedule: str = _field("paper", choices=("paper", "official"), help="neighbourhood schedule")
    official_neighbours: int = _field(10, min=1, max=1000, help="neighbours per anchor (official)")
    augment_views: int = _field(1, min=0, max=16, help="augmented views per image for AUG_i")
    bank_update: str = _field("image", choices=("image", "view"),
                              help="image: the network sees the image (and its views in L_ss), the bank row is "
                                   "refreshed with the image's embedding; view: the first augmented view replaces "
                                   "the image in the step (the official code trains on augmented images only)")
    view_loss: str = _field("query", choices=("query", "aug_set"),
                            help="query: each view is a query for its image's bank row; aug_set: views join "
                                 "the positive set of Eq. 1 (SampleSpecificLoss views)")
    encoder_lr_scale: float = _field(1.0, min=0.0, max=1.0,
                                     help="the encoder's learning rate as a fraction of train.lr (auto-encoder "
                                          "methods): below 1 keeps more of a model.init_from encoder; 0 freezes "
                                          "its weights (BatchNorm statistics still follow the data)")
    device: str = _field("auto", help="auto, cpu, cuda, cuda:N")
    amp: bool = _field(True, help="mixed precision on CUDA (bfloat16 where supported, else float16 with a "
                                  "gradient scaler)")
    channels_last: bool = _field(True, help="CUDA: network and batches in channels-last memory format")
    deterministic: bool = _field(True, help="CUDA: deterministic cuDNN kernels (identical reruns); false lets "
                                            "cuDNN pick the fastest kernels per shape (cudnn.benchmark)")
    sync_batchnorm: bool = _field(False, help="DDP on CUDA: SyncBatchNorm (BatchNorm statistics over the "
                                              "global batch; ignored on CPU/gloo)")
    val_every: int = _field(1, min=1, max=10000, help="validate every N epochs")
    max_steps_per_epoch: int = _field(0, min=0, help="0 = full epoch; >0 caps steps (CPU smoke runs)")


@dataclass
class ScoreConfig:
    """Eq. 4 anomaly scoring."""

    mode: str = _field("paper", choices=("paper", "official"), help="weighted (paper) or mean arccos/pi")
    k: int = _field(100, min=1, max=100000, help="K nearest bank entries")
    backend: str = _field("auto", choices=("auto", "torch", "faiss"), help="kNN backend")
    bank: str = _field("memory", choices=("memory", "refresh"),
                       help="scoring bank of the bank methods: memory (paper: the momentum-averaged training-time "
                            "embeddings) or refresh (eval-mode embeddings of the normal train images under the "
                            "scored network)")
    tta: str = _field("none", choices=("none", "flip", "shift", "flipshift"),
                      help="test-time augmentation of the bank methods' query (and refreshed bank): unit mean "
                           "embedding of flipped and/or S/32-shifted copies")


@dataclass
class Config:
    """The whole resolved configuration of one salad-med run."""

    seed: int = _field(0, min=0, max=2**32 - 1, help="global seed")
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    params: dict = _field({}, help="the method's own hyper-parameters (salad-med config show lists them)")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        msg = f"{_where(source, key)}: {value!r} matches none of {tp}"
        raise ConfigError(msg)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        if value is None:
            return {}
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp) or (Any,)
            return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)] \
                if item_tp is not Any else list(value)
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    msg = f"{_where(source, key)}: expected {name}, got {type(value).__name__} {value!r}"
    raise ConfigError(msg)


def _build(cls: type, data: dict[str, Any], prefix: str, source: str | None) -> Any:
    if not isinstance(data, dict):
        msg = f"{_where(source, prefix or '<root>')}: expected a mapping, got {type(data).__name__}"
        raise ConfigError(msg)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        msg = f"{_where(source, key)}: unknown key (known: {', '.join(sorted(fields))})"
        raise ConfigError(msg)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{key}.", source)
            continue
        value = _coerce(value, tp, key, source)
        meta = fields[name].metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            msg = f"{_where(source, key)}: {value!r} is not one of {list(meta['choices'])}"
            raise ConfigError(msg)
        if meta.get("min") is not None and (value < meta["min"] or
                                            (meta.get("exclusive_min") and value == meta["min"])):
            bound = f"must be above {meta['min']}" if meta.get("exclusive_min") else f"is below the minimum {meta['min']}"
            msg = f"{_where(source, key)}: {value!r} {bound}"
            raise ConfigError(msg)
        if meta.get("max") is not None and value > meta["max"]:
            msg = f"{_where(source, key)}: {value!r} is above the maximum {meta['max']}"
            raise ConfigError(msg)
        kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    """Validate a nested dict (missing keys take defaults) into a :class:`Config`.

    ``train.method`` must name a registered method; ``params`` is validated against that method's
    ``Params`` dataclass (unknown key, wrong type or out-of-range value -> error) and filled with its
    defaults.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value; the message names key and source.
    """
    cfg = _build(Config, data or {}, "", source)
    from salad_med.methods.registry import get_method

    try:
        method = get_method(cfg.train.method)
    except ConfigError as err:
        msg = f"{_where(source, 'train.method')}: {str(err).split(': ', 1)[-1]}"
        raise ConfigError(msg) from None
    if method.Params is not None:
        cfg.params = dataclasses.asdict(_build(method.Params, cfg.params or {}, "params.", source))
    elif cfg.params:
        msg = f"{_where(source, 'params')}: method {cfg.train.method!r} takes no params (got {sorted(cfg.params)})"
        raise ConfigError(msg)
    return cfg


def _method_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the chosen method's ``defaults`` filled in where the user set nothing."""
    from salad_med.methods.registry import get_method

    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    name = train.get("method", TrainConfig.method)
    try:
        defaults = get_method(name).defaults if isinstance(name, str) else {}
    except ConfigError:
        return data  # reported by config_from_dict with the file name
    for dotted, value in defaults.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(parts[-1], value)
    return data


def _set_path(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            msg = f"{source}: {dotted}: {part!r} is not a section"
            raise ConfigError(msg)
        node = nxt
    node[parts[-1]] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a (multi-line) PyYAML error: ``at line L, column C: problem (context)``."""
    mark = getattr(err, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            msg = f"--set {item!r}: expected section.key=value"
            raise ConfigError(msg)
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            msg = f"--set {item!r}: empty key"
            raise ConfigError(msg)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            msg = f"--set {key}: cannot parse value {raw!r}: {_yaml_problem(err)}"
            raise ConfigError(msg) from None
        _set_path(data, key, value, "--set")
    return data


def _resolve_config_path(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config file: the path itself, else (for a bare name) ``configs/<name>.yaml`` or ``<name>.yaml``
    next to the including file."""
    p = Path(path)
    if p.exists():
        return p
    for folder in ([relative_to] if relative_to else []) + [CONFIG_DIR]:
        for candidate in (folder / p, folder / f"{p}.yaml"):
            if candidate.exists():
                return candidate
    return p


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _read_config_file(path: str | os.PathLike, relative_to: Path | None = None,
                      chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """The YAML mapping of a config file with its ``base:`` files merged underneath (deep merge, the
    including file wins); returns ``(data, source name)``."""
    p = _resolve_config_path(path, relative_to)
    source = str(p)
    if source in chain:
        msg = f"{source}: config 'base' chain loops ({' -> '.join([*chain, source])})"
        raise ConfigError(msg)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        msg = f"{source}: cannot read config ({err.strerror or err})"
        raise ConfigError(msg) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        msg = f"{source}: invalid YAML {_yaml_problem(err)}"
        raise ConfigError(msg) from None
    if not isinstance(data, dict):
        msg = f"{source}: top level must be a mapping"
        raise ConfigError(msg)
    bases = data.pop("base", None)
    if bases is None:
        return data, source
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        msg = f"{source}: base: expected a config name or a list of them, got {bases!r}"
        raise ConfigError(msg)
    merged: dict[str, Any] = {}
    for name in bases:
        part, _ = _read_config_file(name, p.parent, (*chain, source))
        merged = _deep_merge(merged, part)
    return _deep_merge(merged, data), source


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (``None`` = built-in defaults), apply ``--set`` overrides and validate.

    A config may start from others: ``base: nih`` (or a list, merged in order) loads those files first
    and deep-merges this one on top, so presets such as ``configs/official.yaml`` can be combined with a
    data set's config (``base: [nih, official]``).

    Args:
        path: YAML file; a bare name such as ``"demo"`` resolves to ``configs/demo.yaml``.
        overrides: ``["train.lr=1e-3", "model.arch=conv6"]``.

    Raises:
        ConfigError: unreadable file, invalid YAML, a ``base`` loop, unknown key, wrong type or
            out-of-range value.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        data, source = _read_config_file(path)
    # validate the file alone first so that its errors name the file, then with overrides
    config_from_dict(_method_defaults(copy.deepcopy(data)), source)
    if overrides:
        data = apply_overrides(data, overrides)
        return config_from_dict(_method_defaults(data), f"{source} (with --set)")
    return config_from_dict(_method_defaults(data), source)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML, atomically (temp file + rename)."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
