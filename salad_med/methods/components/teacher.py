"""The frozen teacher / feature extractor of the survey comparators, trained from scratch on the user's data.

SPADE (:mod:`salad_med.methods.spade`), Uninformed Students and Reverse Distillation++ read the multi-scale
features of a **frozen pre-trained encoder**. anomalib's versions download ImageNet weights; here the
teacher is one of our own networks (``conv6`` / ``resnet18``, 1 channel, any bit depth) pre-trained with
SimCLR (:mod:`salad_med.methods.simclr`) on the normal radiographs of the run's own train split, offline:

* ``params.teacher_run: RUN_DIR`` loads the encoder of an existing run (``salad-med pretrain --method
  simclr``, or any run whose network is an embedding auto-encoder) through
  :func:`~salad_med.evaluation.inference.load_run` (``torch.load(weights_only=True)``);
* otherwise SimCLR is **pre-trained inline** at the start of training (:func:`pretrain_teacher`), with the
  ``params.teacher_*`` budget, on the same train split (model selection on the same val split), and
  **cached** under ``<cache>/teachers/<key>/`` (``<cache>`` = ``params.teacher_cache``, else the folder of
  the run's image cache: ``data.cache_dir`` when set, which ``salad-med compare`` shares between its
  runs). The key hashes the teacher's config (architecture, budget, ``params.teacher_seed``) and the
  train/val image ids, labels and cache files, so every seed and every method sharing a split and a
  teacher budget reuses one teacher. The teacher seed is ``params.teacher_seed``, not the run's ``seed``:
  the spread over seeds of a teacher method measures its own randomness, with the teacher fixed. An
  interrupted pre-training resumes exactly (its folder ``<key>.partial`` is an ordinary run directory);
  a lock file serialises concurrent runs asking for the same teacher.

The teacher is frozen explicitly (:class:`FrozenEncoder`: ``requires_grad_(False)``, always in eval
mode, never in an optimiser) and its weights live in the method's network, so a run's checkpoint is
self-contained: scoring and export never need the teacher run again.

The same loader initialises an auto-encoder's encoder: ``model.init_from: RUN_DIR`` (applied in
:meth:`salad_med.methods.base.AnomalyMethod.build_model`, see :func:`init_encoder_from`).

Example (a new teacher method):
    >>> @dataclass
    ... class MyParams(TeacherParams):
    ...     levels: list[int] = config_field([], help="teacher levels ([] = defaults)")
    >>> @register_method
    ... class Mine(TeacherMethod):
    ...     name, Params = "mine", MyParams
    ...     def build_model(self):
    ...         return MyNet(teacher=self.build_teacher(), students=...)   # model.teacher is the teacher
    ...     def training_loss(self, trainer, batch, outputs): ...           # teacher loaded by on_fit_start

See Also:
    :mod:`salad_med.methods.simclr` (the pre-training), :meth:`salad_med.nets.blocks.EmbeddingAutoEncoder.feature_pyramid`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from salad_med.config import Config, config_from_dict, config_to_dict
from salad_med.config import config_field as _field
from salad_med.errors import CheckpointError, ConfigError, DataError
from salad_med.log import get_logger
from salad_med.methods.base import AnomalyMethod

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer
    from salad_med.nets.blocks import EmbeddingAutoEncoder

__all__ = [
    "TeacherParams",
    "FrozenEncoder",
    "TeacherMethod",
    "freeze",
    "build_teacher",
    "embedding_network",
    "load_encoder_network",
    "init_encoder_from",
    "teacher_config",
    "teacher_cache_key",
    "teacher_cache_dir",
    "pretrain_teacher",
    "preserved_rng",
    "pooled_pyramid",
    "clamp_k",
    "ARCH_KEYS",
]

log = get_logger("teacher")

#: Config keys that must agree between a run and the run its teacher / encoder initialisation comes from.
ARCH_KEYS = ("data.image_size", "model.arch", "model.latent_dim", "model.base_channels", "model.stem_stride",
             "model.norm")


@dataclass
class TeacherParams:
    """The teacher's ``params`` keys, shared by every teacher method (subclass it for a method's Params)."""

    teacher_run: str = _field("", help="run directory whose encoder is the frozen teacher (e.g. `salad-med pretrain "
                                       "--method simclr`); '' = pre-train SimCLR inline on the train split (cached)")
    teacher_checkpoint: str = _field("best", help="checkpoint of teacher_run: best, last or a path")
    teacher_epochs: int = _field(0, min=0, max=10000, help="inline SimCLR teacher: epochs (0 = the run's own budget, "
                                                           "train.pretrain_epochs + train.rounds x train.epochs_per_round)")
    teacher_batch_size: int = _field(64, min=2, max=4096, help="inline SimCLR teacher: batch (2 views per image)")
    teacher_lr: float = _field(1e-3, min=0.0, max=1.0, exclusive_min=True, help="inline SimCLR teacher: Adam lr")
    teacher_tau: float = _field(0.2, min=0.02, max=10.0, help="inline SimCLR teacher: NT-Xent temperature")
    teacher_seed: int = _field(0, min=0, max=2**32 - 1,
                               help="inline SimCLR teacher: seed (not the run's: seeds share one teacher)")
    teacher_cache: str = _field("", help="folder of cached inline teachers ('' = the run's image cache folder)")


# ------------------------------------------------------------------------------------------------
# the frozen module
# ------------------------------------------------------------------------------------------------
def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` and eval mode, in place; returns ``module``."""
    module.requires_grad_(False)
    return module.eval()


def pooled_pyramid(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global average pool of each level, concatenated: ``[(B, C_l, H_l, W_l)] -> (B, sum_l C_l)`` float32."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1)


class FrozenEncoder(nn.Module):
    """A frozen embedding auto-encoder used as teacher / feature extractor.

    Always in eval mode (``train(True)`` is ignored, so BatchNorm statistics never move), no parameter
    requires a gradient, and every call runs without autograd. The ``loaded`` buffer records whether
    pre-trained weights were copied in (:meth:`load_network`); it is saved with the method's network, so
    a resumed or reloaded run knows its teacher is in place.

    Args:
        net: the network (:class:`~salad_med.nets.blocks.EmbeddingAutoEncoder`); its ``state_dict`` keys
            appear under ``net.``.
        levels: pyramid levels served by :meth:`forward` (None = ``net.default_pyramid_levels``).

    Attributes:
        levels: the validated levels; ``shapes``: their ``(C_l, H_l, W_l)``; ``channels``: ``[C_l]``.

    Shapes:
        ``forward(x (B, 1, S, S)) -> [(B, C_l, H_l, W_l) for l in levels]``.
    """

    def __init__(self, net: EmbeddingAutoEncoder, levels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.levels = net.check_levels(levels)
        self.register_buffer("loaded", torch.zeros((), dtype=torch.bool))
        freeze(self)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever ``mode`` (the trainer switches its whole model to train mode)."""
        return super().train(False)

    @property
    def is_loaded(self) -> bool:
        """Whether pre-trained weights were copied in."""
        return bool(self.loaded)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return self.net.pyramid_shapes(self.levels)

    @property
    def channels(self) -> list[int]:
        return [c for c, _, _ in self.shapes]

    def embedding_network(self) -> EmbeddingAutoEncoder:
        """The wrapped network (see :func:`embedding_network`)."""
        return self.net

    @torch.no_grad()
    def load_network(self, net: EmbeddingAutoEncoder) -> None:
        """Copy all weights of ``net`` (same architecture) and mark the teacher loaded."""
        self.net.load_state_dict(net.state_dict(), strict=True)
        self.loaded.fill_(True)
        freeze(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature pyramid at :attr:`levels` (no gradient)."""
        with torch.no_grad():
            return self.net.feature_pyramid(x, self.levels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The unit embedding ``(B, D)`` (no gradient)."""
        with torch.no_grad():
            return self.net.encode(x).float()

    def embed_with_pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(embedding (B, D), pyramid)`` in one pass (no gradient)."""
        with torch.no_grad():
            return self.net.encode_with_pyramid(x, self.levels)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`pooled_pyramid` of :meth:`forward`: ``(B, sum_l C_l)``."""
        return pooled_pyramid(self(x))


def build_teacher(cfg: Config, levels: Sequence[int] | None = None) -> FrozenEncoder:
    """A :class:`FrozenEncoder` of the architecture of ``cfg.model`` at ``cfg.data.image_size`` with
    random (not yet loaded) weights: what a teacher method's ``build_model`` holds, before
    :meth:`TeacherMethod.ensure_teacher` copies the pre-trained weights in (``model.init_from`` is not
    applied: the teacher comes from ``params.teacher_run`` or inline pre-training).

    Raises:
        ConfigError: unknown architecture / image size; ValueError: bad ``levels``.
    """
    from salad_med.nets import build_network

    with preserved_rng():  # the teacher's throw-away init leaves the global stream to the method's own modules
        net = build_network(cfg.model, cfg.data.image_size)
    try:
        return FrozenEncoder(net, levels if levels else None)
    except ValueError as err:
        msg = f"params.levels: {err}"
        raise ConfigError(msg) from None


# ------------------------------------------------------------------------------------------------
# loading an encoder from a run
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing torch's (CPU and CUDA), numpy's and python's global RNG streams, nor
    cuDNN's determinism flags (loading or pre-training a teacher then leaves the caller's run exactly as
    it would be without it)."""
    torch_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def embedding_network(model: nn.Module) -> EmbeddingAutoEncoder:
    """The embedding auto-encoder of a method's network: ``model`` itself, or what its
    ``embedding_network()`` returns (SimCLR's, SPADE's and any teacher method's network define it).

    Raises:
        ValueError: the network holds no embedding auto-encoder.
    """
    from salad_med.nets.blocks import EmbeddingAutoEncoder

    if isinstance(model, EmbeddingAutoEncoder):
        return model
    getter = getattr(model, "embedding_network", None)
    net = getter() if callable(getter) else None
    if isinstance(net, EmbeddingAutoEncoder):
        return net
    msg = f"its network ({type(model).__name__}) holds no embedding auto-encoder (conv6 / resnet18)"
    raise ValueError(msg)


def _value(cfg: Config, dotted: str) -> Any:
    """``cfg.model.arch`` for ``"model.arch"``."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_architecture(source: Config, cfg: Config, what: str) -> None:
    keys = [k for k in ARCH_KEYS if not (k == "model.stem_stride" and cfg.model.arch != "resnet18")]
    diff = [(k, _value(source, k), _value(cfg, k)) for k in keys if _value(source, k) != _value(cfg, k)]
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diff)
        sets = " ".join(f"--set {k}={a}" for k, a, _ in diff)
        msg = f"{what}: its network differs from this config's ({shown}); train with the same network ({sets})"
        raise ConfigError(msg)


def load_encoder_network(run_dir: str | os.PathLike, cfg: Config, checkpoint: str = "best",
                         what: str = "params.teacher_run") -> EmbeddingAutoEncoder:
    """The embedding auto-encoder of a trained run, on CPU, checked against ``cfg``'s architecture.

    Loaded with :func:`~salad_med.evaluation.inference.load_run` (``weights_only=True``) without touching
    the caller's RNG streams (:func:`preserved_rng`).

    Args:
        run_dir: the run directory.
        cfg: the config of the run that will use the encoder (its ``model.*`` and ``data.image_size``
            must equal the source run's, see :data:`ARCH_KEYS`).
        checkpoint: ``"best"``, ``"last"`` or a path.
        what: the config key named in error messages.

    Raises:
        ConfigError: the run cannot be loaded, has no embedding auto-encoder, or another architecture.
    """
    from salad_med.evaluation.inference import load_run

    where = f"{what}={run_dir}"
    with preserved_rng():
        try:
            run = load_run(run_dir, checkpoint, device="cpu")
        except CheckpointError as err:
            msg = f"{where}: {err}"
            raise ConfigError(msg) from None
    try:
        net = embedding_network(run.model)
    except ValueError as err:
        msg = f"{where}: {run.cfg.train.method} run: {err}"
        raise ConfigError(msg) from None
    _check_architecture(run.cfg, cfg, where)
    return net


def init_encoder_from(net: EmbeddingAutoEncoder, cfg: Config, run_dir: str | os.PathLike,
                      checkpoint: str = "best") -> EmbeddingAutoEncoder:
    """``model.init_from``: copy the encoder weights of ``run_dir``'s network into ``net`` (in place; the
    decoder keeps its initialisation). Returns ``net``.

    Raises:
        ConfigError: see :func:`load_encoder_network`.
    """
    source = load_encoder_network(run_dir, cfg, checkpoint, what="model.init_from")
    net.load_encoder_state_dict(source.encoder_state_dict())
    log.info("encoder initialised from %s", run_dir)
    return net


# ------------------------------------------------------------------------------------------------
# inline SimCLR pre-training, cached
# ------------------------------------------------------------------------------------------------
def teacher_config(cfg: Config, params: TeacherParams) -> Config:
    """The SimCLR config of the inline teacher of a run: ``cfg``'s data, preprocessing and network
    (without ``model.init_from``), ``train.method=simclr`` for ``params.teacher_epochs`` epochs (0: the
    run's own epoch budget, so that ``salad-med compare`` gives a teacher method's pre-training the
    epochs the other methods train for) at batch
    ``teacher_batch_size`` with Adam (lr ``teacher_lr``, betas 0.9/0.999, no weight decay),
    ``seed=teacher_seed``, NT-Xent temperature ``teacher_tau`` (SimCLR's other params at their defaults).
    ``train.max_steps_per_epoch``, ``train.device`` and ``train.amp`` are the run's; every other
    ``train.*``, ``score.*`` (but the kNN backend) and ``split.*`` key is at its default, so that methods
    whose configs differ only there share the teacher.
    """
    from salad_med.config import ScoreConfig, SplitConfig, TrainConfig

    t = cfg.train
    epochs = int(params.teacher_epochs) or t.pretrain_epochs + t.rounds * t.epochs_per_round
    if epochs < 1:
        msg = "params.teacher_epochs=0 takes the run's epoch budget, which is 0: set params.teacher_epochs"
        raise ConfigError(msg)
    d = config_to_dict(cfg)
    d["seed"] = int(params.teacher_seed)
    d["model"]["init_from"] = ""
    d["data"].update(augment=True, augmentation="default")  # SimCLR draws its own views
    # every key SimCLR does not read takes its default: methods whose configs differ only there (their
    # own train.* defaults, score.*, split.*) share one teacher
    d["train"] = {**dataclasses.asdict(TrainConfig()), "method": "simclr", "pretrain_epochs": epochs, "rounds": 0,
                  "batch_size": int(params.teacher_batch_size), "lr": float(params.teacher_lr), "beta1": 0.9,
                  "beta2": 0.999, "weight_decay": 0.0, "val_every": 1,
                  "max_steps_per_epoch": t.max_steps_per_epoch, "device": t.device, "amp": t.amp,
                  "sync_batchnorm": t.sync_batchnorm}
    d["score"] = {**dataclasses.asdict(ScoreConfig()), "backend": cfg.score.backend}
    d["split"] = dataclasses.asdict(SplitConfig())
    d["params"] = {"tau": float(params.teacher_tau)}
    return config_from_dict(d, source="inline teacher")


def _ids(ds) -> list[str]:
    return list(getattr(ds, "image_ids", [])) or [str(i) for i in range(len(ds))]


def teacher_cache_key(teacher_cfg: Config, train_ds, val_ds) -> str:
    """``simclr-<16 hex>``: hash of the teacher config (without the keys a resume may change) and of the
    train/val image ids, val labels and image-cache files (whose names hash paths, sizes, times and
    preprocessing)."""
    from salad_med.engine.trainer import RESUMABLE_KEYS

    resolved = config_to_dict(teacher_cfg)
    for dotted in RESUMABLE_KEYS:  # where the run happens, not what it computes
        section, key = dotted.split(".")
        resolved[section].pop(key, None)
    h = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode())
    for ds in (train_ds, val_ds):
        cache = getattr(ds, "cache", None)
        h.update(f"\n{getattr(ds, 'split', '')}\n{Path(cache.path).name if cache is not None else ''}\n".encode())
        h.update("\n".join(_ids(ds)).encode())
    h.update(np.asarray(val_ds.labels, dtype=np.int64).tobytes())
    return f"simclr-{h.hexdigest()[:16]}"


def teacher_cache_dir(trainer: Trainer, params: TeacherParams) -> Path:
    """``params.teacher_cache``, else the folder of the train split's image cache, else ``<run>/cache``."""
    if params.teacher_cache:
        return Path(params.teacher_cache)
    cache = getattr(trainer.train_ds, "cache", None)
    return Path(cache.path).parent if cache is not None else Path(trainer.run_dir) / "cache"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def pretrain_teacher(cfg: Config, params: TeacherParams, train_ds, val_ds, cache_dir: str | os.PathLike) -> Path:
    """Pre-train (or reuse) the inline SimCLR teacher of a run; returns its run directory.

    The run is ``<cache_dir>/teachers/<teacher_cache_key>/`` (an ordinary ``simclr`` run: ``best.pt``,
    ``metrics.csv``...). When it exists it is reused; otherwise it is trained by the generic trainer on
    ``train_ds``'s images (a new dataset over the same cache, serving SimCLR's two views) and selected on
    ``val_ds``, in ``<key>.partial/`` (resumed exactly if a previous attempt was interrupted) and renamed
    when finished. Runs under :func:`preserved_rng`.

    Raises:
        ConfigError: under ``torchrun`` (pre-train first with ``salad-med pretrain`` and pass
            ``params.teacher_run``).
        DegenerateScoreError: no teacher epoch ranked the validation images.
    """
    from salad_med.data.dataset import SaladDataset
    from salad_med.engine.distributed import get_context
    from salad_med.engine.trainer import Trainer

    if get_context().distributed:
        msg = ("params.teacher_run is empty: the inline SimCLR teacher is not pre-trained under torchrun; run "
               "`salad-med pretrain --method simclr` first and pass --set params.teacher_run=RUN_DIR")
        raise ConfigError(msg)
    tcfg = teacher_config(cfg, params)
    key = teacher_cache_key(tcfg, train_ds, val_ds)
    root = Path(cache_dir) / "teachers"
    final, partial = root / key, root / f"{key}.partial"
    if (final / "best.pt").is_file():
        log.info("reusing the SimCLR teacher %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock"):
        if (final / "best.pt").is_file():  # another process finished it while we waited
            return final
        resume = (partial / "last.pt").is_file()
        log.info("%s the SimCLR teacher in %s (%d epochs, batch %d)", "resuming" if resume else "pre-training",
                 partial, tcfg.train.pretrain_epochs, tcfg.train.batch_size)
        views_ds = SaladDataset(train_ds.rows, train_ds.cache, train_ds.cache_rows, "train", views=0,
                                seed=tcfg.seed)
        with preserved_rng():
            Trainer(tcfg, views_ds, val_ds, partial, resume=resume).fit()
        if final.exists():  # a stale, unfinished folder
            shutil.rmtree(final)
        os.replace(partial, final)
    return final


# ------------------------------------------------------------------------------------------------
# kNN helpers shared by the teacher methods
# ------------------------------------------------------------------------------------------------
def clamp_k(k: int, available: int, key: str = "params.k") -> int:
    """``min(k, available)``, warning when lowered (a kNN over the normal training images cannot ask for
    more neighbours than there are images; K = N still ranks images: it is the mean distance to all).

    Raises:
        DataError: no normal training image at all.
    """
    if available < 1:
        msg = "no normal training image to search: the train split holds only known anomalies"
        raise DataError(msg)
    if k <= available:
        return int(k)
    text = (f"{key}={k} exceeds the {available} normal training images: using K={available} (every normal "
            f"image is a neighbour)")
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    log.warning("%s", text)
    return int(available)


# ------------------------------------------------------------------------------------------------
# the base of teacher methods
# ------------------------------------------------------------------------------------------------
class TeacherMethod(AnomalyMethod):
    """Base of methods built on a frozen teacher (SPADE, Uninformed Students, RD++).

    Contract for subclasses:

    * ``Params`` subclasses :class:`TeacherParams` (optionally with ``levels: list[int]``, the teacher's
      pyramid levels, ``[]`` = the network's defaults);
    * ``build_model()`` returns a module whose attribute ``teacher`` is :meth:`build_teacher`'s
      :class:`FrozenEncoder` (students, decoders, projections beside it; only those are trainable:
      :meth:`trainable_parameters` skips the frozen teacher);
    * the teacher's weights are copied in by :meth:`ensure_teacher` at :meth:`on_fit_start`, before the
      first step (or the single fit of a ``trains_network = False`` method); a subclass overriding
      ``on_fit_start`` calls ``super().on_fit_start(trainer)`` first; one overriding
      ``state_dict``/``load_state_dict`` merges with ``super()``'s (it records where the teacher came from).

    Resumed and reloaded runs get the teacher from their own checkpoint (it is part of the network).
    """

    Params = TeacherParams

    def __init__(self, cfg: Config, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self.teacher_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ network
    def teacher_levels(self) -> tuple[int, ...] | None:
        """``params.levels`` when the Params have it and it is not empty, else None (defaults)."""
        levels = getattr(self.params, "levels", None)
        return tuple(levels) if levels else None

    def build_teacher(self) -> FrozenEncoder:
        """:func:`build_teacher` at :meth:`teacher_levels` (random weights until :meth:`ensure_teacher`)."""
        return build_teacher(self.cfg, self.teacher_levels())

    @staticmethod
    def teacher_of(model: nn.Module) -> FrozenEncoder:
        """The :class:`FrozenEncoder` of a method network (``model.teacher``)."""
        teacher = getattr(model, "teacher", None)
        if not isinstance(teacher, FrozenEncoder):
            msg = f"{type(model).__name__} has no FrozenEncoder `teacher` attribute"
            raise TypeError(msg)
        return teacher

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        frozen = {id(p) for p in self.teacher_of(model).parameters()}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]

    # ------------------------------------------------------------------ training hooks
    def setup(self, trainer: Trainer) -> None:
        """Refuse what cannot work before any time is spent (``model.init_from`` on a teacher method)."""
        if getattr(self.cfg.model, "init_from", ""):
            msg = (f"model.init_from is for auto-encoder methods; {self.name}'s frozen teacher comes from "
                   f"params.teacher_run (or inline SimCLR pre-training when empty)")
            raise ConfigError(msg)

    def on_fit_start(self, trainer: Trainer) -> None:
        """Copy the pre-trained teacher in (no-op after a resume: the checkpoint holds it)."""
        self.ensure_teacher(trainer)

    def ensure_teacher(self, trainer: Trainer) -> FrozenEncoder:
        """The trainer's model's teacher with pre-trained weights: from ``params.teacher_run``, else from
        the (cached) inline SimCLR pre-training. Idempotent; never changes the global RNG streams.

        Raises:
            ConfigError: unusable ``teacher_run`` (missing, another architecture) or inline pre-training
                under ``torchrun``.
        """
        teacher = self.teacher_of(trainer.model)
        if teacher.is_loaded:
            return teacher
        p = self.params
        if p.teacher_run:
            run_dir, source = Path(p.teacher_run), "teacher_run"
        else:
            run_dir = pretrain_teacher(self.cfg, p, trainer.train_ds, trainer.val_ds, teacher_cache_dir(trainer, p))
            source = "inline"
        net = load_encoder_network(run_dir, self.cfg, p.teacher_checkpoint if source == "teacher_run" else "best")
        teacher.load_network(net)
        self.teacher_info = {"source": source, "run_dir": str(Path(run_dir).resolve()),
                             "checkpoint": p.teacher_checkpoint if source == "teacher_run" else "best"}
        log.info("%s teacher: %s (%s)", self.name, run_dir, source)
        return teacher

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": dict(self.teacher_info)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.teacher_info = dict(state.get("teacher") or {})

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def ood_embedding(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The teacher's unit embedding."""
        return self.teacher_of(model).embed(x)
