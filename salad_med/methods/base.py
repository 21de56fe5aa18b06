"""What a method is: the contract between one method's home and the trainer, evaluator, exporter and node.

A method (SALAD, one of its ablations, a baseline, a survey comparator) is one module or folder under
:mod:`salad_med.methods` that defines a subclass of :class:`AnomalyMethod` and registers it with
:func:`salad_med.methods.registry.register_method`. It declares:

* **what it is**: ``name``, ``title``, ``paper`` (reference), ``has_bank``, ``map_kind``
  (``"native"``, ``"reconstruction"``, or ``None`` for image-level methods), ``trains_network``;
* **its defaults**: ``defaults`` (dotted config keys applied when the user's config does not set
  them) and an optional ``Params`` dataclass validated as the config's ``params:`` section;
* **its network**: :meth:`build_model` (a pure ``nn.Module``) and :meth:`train_module` (what one
  training step runs; the trainer wraps it in DDP);
* **its loss and training state**: :meth:`setup` (bank, centre...), :meth:`training_loss`,
  :meth:`after_step` (no-grad state updates), :meth:`on_fit_start`, :meth:`on_epoch_start`,
  :meth:`state_dict` / :meth:`load_state_dict` (checkpointed with the run);
* **its scorer**: :meth:`make_scorer`, :meth:`fit_scorer`, :meth:`features` (what the scorer reads),
  :meth:`score` (raw scores, higher = more abnormal), :meth:`anomaly_map`, :meth:`export_module`.

Every method has an anomaly map: methods with their own (``map_kind`` ``"native"`` or
``"reconstruction"``) override :meth:`anomaly_map`; for the others the default is an **occlusion map of
the raw score** (:func:`occlusion_map`, MONAI's :class:`~monai.visualize.OcclusionSensitivity` driving a
:class:`ScoreNet`): how much the anomaly score drops when a patch around each pixel is hidden.

Nobody outside :mod:`salad_med.methods` compares method names: callers ask the registry for the
method object and use these hooks.

Example:
    >>> method = get_method("salad")(cfg, num_train=len(train_ds))
    >>> model = method.build_model()
    >>> raw = method.score(model, scorer, x)        # (B,) float64
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from salad_med.config import Config

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer
    from salad_med.scoring.scorers import AnomalyScorer

__all__ = ["AnomalyMethod", "TrainBatch", "FeatureScoreNet", "EncoderForward", "ScoreNet", "occlusion_map",
           "OCCLUSION_DEFAULTS", "OCCLUSION_MODES"]


@dataclass
class TrainBatch:
    """One training batch on the device.

    Attributes:
        x: (B, 1, S, S) images in [0, 1].
        index: (B,) int64 dataset rows (= bank rows).
        views: (B, V, 1, S, S) augmented views, or None.
    """

    x: torch.Tensor
    index: torch.Tensor
    views: torch.Tensor | None = None


class EncoderForward(nn.Module):
    """The default training forward of the embedding auto-encoders (the module DDP wraps).

    ``forward(x (B,1,S,S), views (B,V,1,S,S) | None) -> (z (B,D), z_views (B,V,D) | None, x_hat | None)``:
    images and views are encoded in one pass, only the images are decoded (when ``decode``).
    """

    def __init__(self, net: nn.Module, decode: bool):
        super().__init__()
        self.net, self.decode = net, decode

    def forward(self, x: torch.Tensor, views: torch.Tensor | None = None):
        b = x.shape[0]
        if views is not None and views.shape[1] > 0:
            v = views.shape[1]
            z_all = self.net.encode(torch.cat([x, views.flatten(0, 1)]))
            z, z_views = z_all[:b], z_all[b:].reshape(b, v, -1)
        else:
            z, z_views = self.net.encode(x), None
        x_hat = self.net.decode(z) if self.decode else None
        return z, z_views, x_hat


class FeatureScoreNet(nn.Module):
    """``image (B, 1, S, S) -> raw score (B,)``: a feature extractor followed by a scorer head (export).

    Args:
        features: module ``x -> (B, F)``.
        head: module ``(B, F) -> (B,)`` (a scorer's :meth:`~salad_med.scoring.scorers.AnomalyScorer.to_module`).
    """

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ScoreNet(nn.Module):
    """``image (B, 1, S, S) -> raw anomaly score (B, 1)`` float32 through a method's own :meth:`AnomalyMethod.score`.

    What :class:`monai.visualize.OcclusionSensitivity` drives: any method (bank kNN on faiss, sklearn
    scorers, reconstruction error) becomes one module whose single output channel is the raw score
    (higher = more abnormal). Unlike :class:`FeatureScoreNet` it needs no torch form of the scorer.

    Args:
        method: the :class:`AnomalyMethod`.
        model: its network (eval mode).
        scorer: its fitted scorer.
    """

    def __init__(self, method: AnomalyMethod, model: nn.Module, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.model = model
        self.method, self.scorer = method, scorer
        # same mode as the network: OcclusionSensitivity restores the wrapper's mode (recursively) afterwards
        self.train(model.training)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.score(self.model, self.scorer, x).float()[:, None]


#: Settings of the default occlusion map: occluder side ``mask_fraction * S`` (8 px at 64), windows
#: overlapping by ``overlap`` (so ``(2 / mask_fraction - 1)^2`` = 225 occluded copies per image at any S),
#: the hidden patch filled by ``mode`` (see :func:`occlusion_map`; ``blur`` ranked the anomaly pixels of
#: the phantoms' bodies best for all six methods of ``benchmarks/maps.py``, e.g. SALAD 0.58 vs 0.55
#: ``mean_img`` and 0.53 ``gaussian``), ``n_batch`` occluded copies per forward pass. Cost measured there:
#: 0.5-2 s per 64x64 image on one CPU thread (SALAD 2.1 s).
OCCLUSION_DEFAULTS: dict[str, Any] = {"mask_fraction": 0.125, "overlap": 0.5, "mode": "blur", "n_batch": 128}
#: Fill modes of :func:`occlusion_map` (or a constant grey level in [0, 1]).
OCCLUSION_MODES = ("blur", "mean_img", "gaussian", "mean_patch")
# what MONAI writes into the hidden patch in "blur" mode (images are in [0, 1]: never a real pixel)
_SENTINEL = -1.0


class _FillFromReference(nn.Module):
    """``x -> score_net(x with every sentinel pixel replaced by the reference image's pixel)``.

    MONAI's ``OcclusionSensitivity`` fills a hidden patch with a constant; filling it with the sentinel
    and swapping in a blurred copy of the image here gives a *blur* occlusion (the patch loses its
    fine structure but keeps the local grey level and anatomy) while MONAI still places, batches and
    blends the windows.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.reference: torch.Tensor | None = None  # (1, 1, S, S)
        self.train(net.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            x = torch.where(x == _SENTINEL, self.reference.expand_as(x), x)
        return self.net(x)


def _blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1, 1, S, S) -> Gaussian-blurred copy (MONAI ``GaussianFilter``; borders by reflection; the kernel's
    truncation renormalised, so a uniform image stays exactly uniform)."""
    from monai.networks.layers import GaussianFilter

    pad = max(1, int(3 * sigma))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < x.shape[-1] else "replicate")
    smooth = GaussianFilter(spatial_dims=2, sigma=sigma).to(x.device)
    return (smooth(padded) / smooth(torch.ones_like(padded)))[..., pad:-pad, pad:-pad]


def occlusion_map(score_net: nn.Module, x: torch.Tensor, *, mask_fraction: float | None = None,
                  overlap: float | None = None, mode: str | float | None = None,
                  n_batch: int | None = None) -> torch.Tensor:
    """Occlusion map of an anomaly score: ``score(x) - score(x with a patch around each pixel hidden)``.

    Positive where hiding the region **lowers** the anomaly score (the region makes the image look
    abnormal); negative where the filled patch itself looks more abnormal; in raw-score units. MONAI's
    :class:`~monai.visualize.OcclusionSensitivity` takes one image at a time and batches its ``n_batch``
    occluded copies per forward pass; the windows are blended by MONAI's sliding-window inferer. Cost:
    ``(ceil((1 - f) / (f (1 - overlap))) + 1)^2`` forward passes per image for ``f = mask_fraction`` (225
    with the defaults), whatever the image size.

    Fill modes: ``"blur"`` (default): the patch shows a Gaussian-blurred copy of the image (sigma = half the
    occluder side), so small structures (a fracture gap, a lesion, an implant edge) vanish but the grey
    level and the anatomy stay; ``"mean_img"``: the image's mean grey; ``"gaussian"``: MONAI's
    multiplicative Gaussian darkening; ``"mean_patch"``: MONAI's, which in MONAI 1.4-1.6 *multiplies* the
    patch by its mean (its ``add``/``mul`` are swapped) instead of filling it; a float: that grey level.

    Args:
        score_net: module ``(B, 1, S, S) -> (B, 1)`` raw score (e.g. :class:`ScoreNet`).
        x: (B, 1, S, S) images in [0, 1] on the module's device.
        mask_fraction, overlap, mode, n_batch: see :data:`OCCLUSION_DEFAULTS`.

    Returns:
        (B, 1, S, S) float32 map on ``x``'s device.

    Raises:
        ValueError: ``x`` is not (B, 1, S, S) or a setting is out of range.
    """
    import warnings

    from monai.visualize import OcclusionSensitivity

    o = {**OCCLUSION_DEFAULTS, **{k: v for k, v in {"mask_fraction": mask_fraction, "overlap": overlap,
                                                    "mode": mode, "n_batch": n_batch}.items() if v is not None}}
    if x.ndim != 4 or x.shape[1] != 1:
        msg = f"occlusion_map: expected images of shape (B, 1, S, S), got {tuple(x.shape)}"
        raise ValueError(msg)
    if not 0.0 < o["mask_fraction"] <= 1.0 or not 0.0 <= o["overlap"] < 1.0 or int(o["n_batch"]) < 1:
        msg = (f"occlusion_map: need 0 < mask_fraction <= 1, 0 <= overlap < 1, n_batch >= 1; got "
               f"{o['mask_fraction']}, {o['overlap']}, {o['n_batch']}")
        raise ValueError(msg)
    if not (o["mode"] in OCCLUSION_MODES or isinstance(o["mode"], (int, float)) and not isinstance(o["mode"], bool)):
        msg = f"occlusion_map: mode {o['mode']!r} is not one of {list(OCCLUSION_MODES)} or a grey level"
        raise ValueError(msg)
    side = min(int(s) for s in x.shape[2:])
    mask = max(2, min(side, round(o["mask_fraction"] * side)))
    blur = o["mode"] == "blur"
    net = _FillFromReference(score_net) if blur else score_net
    fill = _SENTINEL if blur else (float(o["mode"]) if isinstance(o["mode"], (int, float)) else o["mode"])
    occ = OcclusionSensitivity(net, mask_size=mask, n_batch=int(o["n_batch"]), verbose=False, mode=fill,
                               overlap=float(o["overlap"]), activate=False)
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI 1.4-1.6 index with lists (a torch deprecation warning per window)
        warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
        base = score_net(x.float()).float()  # (B, 1)
        for i in range(x.shape[0]):
            xi = x[i:i + 1].float()
            if blur:
                net.reference = _blurred(xi, mask / 2.0)
            occluded, _ = occ(xi)  # (1, 1, S, S) MetaTensor: the score with each region hidden
            out.append(base[i].view(1, 1, 1, 1) - occluded.as_tensor().float())
    return torch.cat(out) if out else x.new_zeros(x.shape, dtype=torch.float32)


class _Encode(nn.Module):
    """``x -> model.encode(x)`` as a module (the export's feature extractor)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode(x)


class AnomalyMethod:
    """Base of every registered method (see the module docstring for the contract).

    Args:
        cfg: the resolved config (``cfg.params`` holds this method's validated ``Params`` as a dict).
        num_train: number of training images (bank rows), 0 when only scoring.
    """

    #: registry name (``train.method``).
    name: ClassVar[str] = ""
    #: one line for tables and ``--help``.
    title: ClassVar[str] = ""
    #: the reference (authors, venue, link).
    paper: ClassVar[str] = ""
    #: keeps a memory bank of training embeddings.
    has_bank: ClassVar[bool] = False
    #: feeds augmented views to its loss (the dataset then draws ``train.augment_views`` per image).
    uses_views: ClassVar[bool] = False
    #: ``"native"`` (the method's own map), ``"reconstruction"`` (per-pixel error) or None (image-level).
    map_kind: ClassVar[str | None] = None
    #: whether a network is trained by gradient descent (False: features + a fitted scorer only).
    trains_network: ClassVar[bool] = True
    #: names of the loss components :meth:`training_loss` returns besides ``"total"``.
    loss_keys: ClassVar[tuple[str, ...]] = ()
    #: dotted config keys applied when the user's config leaves them unset.
    defaults: ClassVar[dict[str, Any]] = {}
    #: dataclass of the method's own hyper-parameters (the config's ``params:`` section), or None.
    Params: ClassVar[type | None] = None

    def __init__(self, cfg: Config, num_train: int = 0) -> None:
        self.cfg = cfg
        self.num_train = int(num_train)
        self.params = self.Params(**cfg.params) if self.Params is not None else None

    # ------------------------------------------------------------------ description
    @classmethod
    def describe(cls) -> str:
        """``name: title (paper)`` for help texts."""
        return f"{cls.name}: {cls.title}" + (f" ({cls.paper})" if cls.paper else "")

    @classmethod
    def params_fields(cls) -> list[dataclasses.Field]:
        """The ``Params`` dataclass fields (empty without ``Params``)."""
        return list(dataclasses.fields(cls.Params)) if cls.Params is not None else []

    # ------------------------------------------------------------------ network
    def build_model(self) -> nn.Module:
        """The network (weights from torch's global RNG: the trainer seeds before calling).

        ``model.init_from`` (a run directory) copies that run's encoder weights into the new network's
        encoder when the method is built for training (``num_train > 0``; the decoder keeps its random
        initialisation, and the global RNG stream is the same as without it). Empty (the default) changes
        nothing. When only scoring (:func:`~salad_med.evaluation.inference.load_run`, ``num_train == 0``)
        the checkpoint's weights are loaded instead, so the initialising run need not exist then. See
        :func:`salad_med.methods.components.teacher.init_encoder_from`.
        """
        from salad_med.nets import build_network

        net = build_network(self.cfg.model, self.cfg.data.image_size)
        init_from = getattr(self.cfg.model, "init_from", "")
        if init_from and self.num_train > 0:
            from salad_med.methods.components.teacher import init_encoder_from

            init_encoder_from(net, self.cfg, init_from)
        return net

    def train_module(self, model: nn.Module) -> nn.Module:
        """The module one training step calls (wrapped in DDP by the trainer)."""
        return EncoderForward(model, decode=False)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters given to the optimiser (frozen parts are left out)."""
        return [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ training
    def num_epochs(self) -> int:
        """Epochs of the whole schedule (``train.pretrain_epochs`` + rounds x epochs by default)."""
        if not self.trains_network:
            return 0
        t = self.cfg.train
        return t.pretrain_epochs + t.rounds * t.epochs_per_round

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        """Extra ``metrics.csv`` columns of 0-based ``epoch`` (default: ``phase``)."""
        return {"phase": "train"}

    def setup(self, trainer: Trainer) -> None:
        """Create the training state (bank, centre...) on ``trainer.device``. Default: nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first remaining epoch (after a resume too). Default: nothing."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before 0-based ``epoch``. Default: nothing."""

    def prepare_batch(self, batch: TrainBatch) -> TrainBatch:
        """The batch a training step runs on (default: unchanged)."""
        return batch

    def training_loss(self, trainer: Trainer, batch: TrainBatch, outputs: Any) -> dict[str, torch.Tensor]:
        """Loss components of one batch from the :meth:`train_module` outputs; ``"total"`` is minimised."""
        msg = f"{type(self).__name__} trains a network but defines no training_loss"
        raise NotImplementedError(msg)

    def after_step(self, trainer: Trainer, batch: TrainBatch, outputs: Any) -> None:
        """After the optimiser step, without gradient (bank updates). Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Method training state for checkpoints (plain tensors/numbers). Default: empty."""
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore :meth:`state_dict` output. Default: nothing."""

    # ------------------------------------------------------------------ scoring
    def make_scorer(self) -> AnomalyScorer:
        """An unfitted scorer."""
        msg = f"{type(self).__name__} defines no scorer"
        raise NotImplementedError(msg)

    def fit_scorer(self, trainer: Trainer) -> AnomalyScorer:
        """A scorer fitted on the training data (default: on :meth:`features` of the normal train
        images, known anomalies left out)."""
        feats = trainer.train_features(self.features, normal_only=True)
        return self.make_scorer().fit(feats)

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the scorer reads: (B, F) on ``x``'s device (default: the unit-norm embedding)."""
        return model.encode(x).float()

    @torch.no_grad()
    def score(self, model: nn.Module, scorer: AnomalyScorer, x: torch.Tensor) -> torch.Tensor:
        """Raw anomaly scores (B,) float64, higher = more abnormal (eval mode)."""
        return scorer.score_samples_torch(self.features(model, x))

    def anomaly_map(self, model: nn.Module, scorer: AnomalyScorer, x: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, S, S) per-pixel anomaly map on the input grid (higher = more abnormal there).

        Default (image-level methods): the occlusion map of the raw score (:func:`occlusion_map` with
        :data:`OCCLUSION_DEFAULTS`), i.e. how much :meth:`score` drops when a patch around each pixel is
        hidden. Methods with their own map (``map_kind``) override this hook.
        """
        return occlusion_map(ScoreNet(self, model, scorer), x)

    @torch.no_grad()
    def ood_embedding(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The embedding the out-of-distribution guard compares with the training images (default:
        ``model.encode``)."""
        return model.encode(x).float()

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Whether some parameters get no gradient in a step (DDP must then look for them)."""
        return False

    def feature_module(self, model: nn.Module) -> nn.Module:
        """:meth:`features` as a module ``x -> (B, F)`` for export (default: the encoder)."""
        return _Encode(model)

    def export_module(self, model: nn.Module, scorer: AnomalyScorer) -> nn.Module:
        """``image (B, 1, S, S) -> raw score (B,)`` as one module (TorchScript / ONNX).

        Raises:
            NotExportableError: the scorer has no torch form.
        """
        return FeatureScoreNet(self.feature_module(model), scorer.to_module())
