"""SALAD: Self-supervised Aggregation Learning for Anomaly Detection on X-Rays.

Bozorgtabar, Mahapatra, Vray, Thiran, MICCAI 2020, https://arxiv.org/abs/2010.09856. An auto-encoder
whose unit-norm embedding is trained with a reconstruction loss, instance discrimination against a
memory bank (Eq. 1) and an aggregation loss pulling each sample towards its bank neighbourhood (Eq. 2),
weighted as Eq. 3; a test image is scored by its angular distances to the K nearest bank entries
(Eq. 4). The official code is github.com/GuillaumeVray/SALAD (built on AND, Huang et al. 2019).

Files:
    loss.py            Eq. 1-3 as stateless modules (SampleSpecificLoss, AggregationLoss, SaladLoss)
    neighbourhoods.py  the per-round neighbourhoods (paper reading and official anchors)
    method.py          the registered methods ``salad``, ``salad_no_rec``, ``salad_no_agg``

Example:
    >>> from salad_med.methods.registry import get_method
    >>> method = get_method("salad")(cfg, num_train=1000)

See Also:
    :mod:`salad_med.methods.memdae` (same bank and score, L_rec only), :mod:`salad_med.scoring.knn` (Eq. 4).
"""

from salad_med.methods.salad.method import Salad, SaladNoAgg, SaladNoRec

__all__ = ["Salad", "SaladNoRec", "SaladNoAgg"]
