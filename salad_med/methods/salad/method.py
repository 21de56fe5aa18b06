"""SALAD and its Table 1 ablations as registered methods: the training glue around the pure pieces.

SALAD (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856) trains an auto-encoder with
``L = L_rec + lambda (L_ss + L_agg)`` (Eq. 3) against a memory bank of training embeddings: pre-training
(``train.pretrain_epochs`` epochs, no ``L_agg``), then ``train.rounds`` rounds of
``train.epochs_per_round`` epochs whose neighbourhoods are recomputed from the bank at the start of each
round; the bank row of each image is refreshed after every step with momentum ``train.bank_momentum``.
The score is Eq. 4 on the bank rows of the normal training images (known anomalies left out).

========================  ==========================================  ==============================
method                    loss                                         score
========================  ==========================================  ==============================
``salad``                 L_rec + lambda (L_ss + L_agg)                Eq. 4 on the bank
``salad_no_rec``          lambda (L_ss + L_agg)                        Eq. 4
``salad_no_agg``          L_rec + lambda L_ss                          Eq. 4
========================  ==========================================  ==============================

Augmented views (AUG_i of Eq. 1, ``train.augment_views`` per image) enter ``L_ss`` according to
``train.view_loss``: ``query`` (default) makes each view one more query whose positive is its image's
bank row (instance discrimination with augmentation, Wu et al. 2018); ``aug_set`` passes the view
embeddings as extra positives of ``z_i``. Measured on a toy set (bright squares, 64x64, 10 epochs):
``query`` test AUC 0.98, no views 0.88, ``aug_set`` 0.55 (the view term alone drives the loss to ~0 and
the embeddings drift from their bank rows).

See Also:
    :mod:`salad_med.methods.salad.loss` (Eq. 1-3), :mod:`salad_med.methods.salad.neighbourhoods`,
    :mod:`salad_med.methods.memdae` (the same machinery with L_rec only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from salad_med.methods.base import AnomalyMethod, EncoderForward, TrainBatch
from salad_med.methods.registry import register_method

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer
    from salad_med.scoring.scorers import BankScorer

__all__ = ["Salad", "SaladNoRec", "SaladNoAgg", "BankMethod", "PAPER"]

PAPER = "Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856"


class BankMethod(AnomalyMethod):
    """An embedding auto-encoder trained with :class:`~salad_med.methods.salad.loss.SaladLoss` switches,
    a memory bank of momentum-averaged embeddings and the Eq. 4 scorer (SALAD, its ablations, MemDAE)."""

    has_bank = True
    use_rec: bool = True
    use_ss: bool = True
    use_agg: bool = True
    loss_keys = ("rec", "ss", "agg")

    def __init__(self, cfg, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self.bank = None
        self.neigh = None  # Neighbourhoods of the current round
        self.loss_fn = None

    # ------------------------------------------------------------------ schedule
    def round_of(self, epoch: int) -> int:
        """Round of 0-based ``epoch``: 0 during the pre-training epochs, then 1..R."""
        t = self.cfg.train
        if epoch < t.pretrain_epochs:
            return 0
        return 1 + (epoch - t.pretrain_epochs) // t.epochs_per_round

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        rnd = self.round_of(epoch)
        return {"phase": "pretrain" if rnd == 0 else "aggregate", "round": rnd,
                "k": int(self.neigh.k) if (rnd > 0 and self.neigh is not None) else 0}

    # ------------------------------------------------------------------ network and state
    def train_module(self, model: nn.Module) -> nn.Module:
        return EncoderForward(model, decode=self.use_rec)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return not self.use_rec  # without L_rec the decoder gets no gradient

    def build_loss(self) -> nn.Module:
        from salad_med.methods.salad.loss import SaladLoss

        t = self.cfg.train
        return SaladLoss(lam=t.lam, tau=t.tau, rec_kind=t.rec_loss, schedule=t.schedule, use_rec=self.use_rec,
                         use_ss=self.use_ss, use_agg=self.use_agg, use_views=self.uses_views,
                         pixel_reduction=t.rec_reduction)

    def setup(self, trainer: Trainer) -> None:
        from salad_med.methods.components.bank import MemoryBank

        self.loss_fn = self.build_loss()
        self.bank = MemoryBank(max(self.num_train, 1), self.cfg.model.latent_dim, seed=self.cfg.seed,
                               backend=self.cfg.score.backend).to(trainer.device)

    def state_dict(self) -> dict[str, Any]:
        n = self.neigh
        neigh = None if n is None else {"prototypical": n.prototypical.cpu(), "neighbours": n.neighbours.cpu(),
                                        "entropy": None if n.entropy is None else n.entropy.cpu(), "k": int(n.k)}
        return {"bank": None if self.bank is None else self.bank.state_dict(), "neighbourhoods": neigh}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        from salad_med.methods.salad.neighbourhoods import Neighbourhoods

        if self.bank is not None and state.get("bank") is not None:
            self.bank.load_state_dict(state["bank"])
        ns = state.get("neighbourhoods")
        if ns is not None:
            self.neigh = Neighbourhoods(ns["prototypical"].to(device), ns["neighbours"].to(device),
                                        None if ns["entropy"] is None else ns["entropy"].to(device), int(ns["k"]))

    # ------------------------------------------------------------------ training
    def _round_start(self, epoch: int) -> int:
        t = self.cfg.train
        rnd = self.round_of(epoch)
        return t.pretrain_epochs + (rnd - 1) * t.epochs_per_round

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        rnd = self.round_of(epoch)
        if self.use_agg and rnd > 0 and (epoch == self._round_start(epoch) or self.neigh is None):
            from salad_med.methods.salad.neighbourhoods import neighbourhoods

            t = self.cfg.train
            self.neigh = neighbourhoods(self.bank.features, rnd, t.rounds, schedule=t.schedule, k=t.k,
                                        official_neighbours=t.official_neighbours, tau=t.tau,
                                        backend=self.cfg.score.backend)
            trainer.log.info("round %d/%d: neighbourhood size k=%d, %d prototypical samples", rnd, t.rounds,
                             self.neigh.k, int(self.neigh.prototypical.sum()))

    def prepare_batch(self, batch: TrainBatch) -> TrainBatch:
        """``train.bank_update=view``: the first augmented view is the step's image (the official code
        trains on augmented images and writes their embeddings to the bank); otherwise unchanged."""
        if self.cfg.train.bank_update == "view" and batch.views is not None and batch.views.shape[1] > 0:
            return TrainBatch(batch.views[:, 0].contiguous(), batch.index, None)
        return batch

    def training_loss(self, trainer: Trainer, batch: TrainBatch, outputs: Any) -> dict[str, torch.Tensor]:
        z, z_views, x_hat = outputs
        z = z.float()  # losses in float32 (logits over the bank / tau overflow in half precision)
        idx = batch.index
        proto = nbrs = None
        if self.use_agg and self.neigh is not None and self.neigh.k > 0:
            proto, nbrs = self.neigh.select(idx)
        zq, iq, views_arg = z, idx, None
        if z_views is not None and self.cfg.train.view_loss == "query":
            # each augmented view is one more query for its image's bank row (AUG_i of Eq. 1)
            v = z_views.shape[1]
            zq = torch.cat([z, z_views.float().flatten(0, 1)])
            iq = torch.cat([idx, idx.repeat_interleave(v)])
            if nbrs is not None:
                nbrs = torch.cat([nbrs, nbrs.repeat_interleave(v, dim=0)])
                proto = torch.cat([proto, proto.repeat_interleave(v)])
        elif z_views is not None:
            views_arg = z_views.float()
        return self.loss_fn(batch.x, None if x_hat is None else x_hat.float(), zq, self.bank.features, iq,
                            neighbours=nbrs, prototypical=proto, views=views_arg)

    @torch.no_grad()
    def after_step(self, trainer: Trainer, batch: TrainBatch, outputs: Any) -> None:
        from salad_med.engine.distributed import all_gather_cat

        z = outputs[0]
        self.bank.update(all_gather_cat(batch.index), all_gather_cat(z.detach().float()),
                         self.cfg.train.bank_momentum)

    # ------------------------------------------------------------------ scoring
    def make_scorer(self) -> BankScorer:
        from salad_med.scoring.scorers import BankScorer

        s = self.cfg.score
        return BankScorer(k=s.k, mode=s.mode, backend=s.backend)

    def fit_scorer(self, trainer: Trainer) -> BankScorer:
        """Eq. 4 scorer on the normal training images (known anomalies dropped): their bank rows
        (``score.bank=memory``, the paper) or their embeddings under the current network in eval mode
        (``score.bank=refresh``, with the query's test-time augmentation)."""
        if self.cfg.score.bank == "refresh":
            return self.make_scorer().fit(trainer.train_features(self.features, normal_only=True))
        keep = torch.from_numpy(~trainer.known_anomaly)
        return self.make_scorer().fit(self.bank.features.detach().cpu()[keep])

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The query embedding, averaged over ``score.tta`` copies."""
        from salad_med.methods.components.tta import encode_tta

        return encode_tta(model, x, self.cfg.score.tta)

    def feature_module(self, model: nn.Module) -> nn.Module:
        from salad_med.methods.components.tta import TTAEncode

        return TTAEncode(model, self.cfg.score.tta)

    def normal_bank_rows(self, known_anomaly) -> int:
        """Rows the scorer will hold (for the ``score.k`` check before training)."""
        return int((~known_anomaly).sum())


@register_method
class Salad(BankMethod):
    """SALAD: L_rec + lambda (L_ss + L_agg) with augmented views; Eq. 4 score."""

    name = "salad"
    title = "SALAD: reconstruction + sample-specific + aggregation losses over a memory bank, Eq. 4 score"
    paper = PAPER
    uses_views = True


@register_method
class SaladNoRec(BankMethod):
    """Table 1 ablation: lambda (L_ss + L_agg), no reconstruction term (no decoder pass)."""

    name = "salad_no_rec"
    title = "SALAD without L_rec (Table 1 ablation)"
    paper = PAPER
    uses_views = True
    use_rec = False


@register_method
class SaladNoAgg(BankMethod):
    """Table 1 ablation: L_rec + lambda L_ss (pre-training loss throughout)."""

    name = "salad_no_agg"
    title = "SALAD without L_agg (Table 1 ablation)"
    paper = PAPER
    uses_views = True
    use_agg = False
