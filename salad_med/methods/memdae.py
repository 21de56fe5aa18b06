"""MemDAE: the SALAD auto-encoder trained with L_rec only, scored by Eq. 4 against its memory bank.

The paper's Table 1 baseline between the plain DAE and SALAD (Bozorgtabar et al., MICCAI 2020,
https://arxiv.org/abs/2010.09856): the same network, the same momentum-averaged bank of training
embeddings and the same Eq. 4 score as SALAD, without the sample-specific and aggregation losses. The
paper trains the baselines without known anomalies (AR = 0): ``salad-med compare`` gives MemDAE the
manifest it is given; pass an AR = 0 split to match Table 1.

Example:
    >>> get_method("memdae")(cfg, num_train=1000)
"""

from __future__ import annotations

from salad_med.methods.registry import register_method
from salad_med.methods.salad.method import PAPER, BankMethod

__all__ = ["MemDAE"]


@register_method
class MemDAE(BankMethod):
    """L_rec, a bank of momentum-averaged embeddings, Eq. 4 score."""

    name = "memdae"
    title = "MemDAE: auto-encoder (L_rec only) + memory bank, Eq. 4 score (Table 1 baseline)"
    paper = PAPER
    uses_views = False
    use_ss = False
    use_agg = False
    loss_keys = ("rec",)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        """No neighbourhoods: nothing to recompute."""

    def epoch_info(self, epoch: int) -> dict:
        return {"phase": "train"}
