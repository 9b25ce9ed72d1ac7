"""Masked region objectives (ImageBERT, Qi et al. 2020, "Pre-training tasks": MOC and MRFR).

15% of the regions are masked by `vlp.data.masking.mask_regions` (feature zeroed 90% of the time,
kept 10%); both losses count the masked regions of matched pairs only (`batch.region_targets`).
- MOC, masked object classification: predict the detector's class of the region. The paper uses
  the hard label with cross-entropy (`target="label"`); `target="distribution"` is UNITER's variant,
  KL divergence to the detector's whole class distribution.
- MRFR, masked region feature regression: reconstruct the region's original feature, L2 loss
  (mean squared error per feature dimension, averaged over regions).

InterBERT (Lin et al. 2020, pre-training tasks: MRM) has one region objective:
- MRM, masked region modeling: regions are masked by `vlp.data.masking.mask_regions_overlap` (an anchor
  and every region overlapping it by IoU >= 0.4, zeroed) and the model predicts each masked region's
  class distribution: KL divergence from the detector's distribution (`batch.region_probs`, the region
  store's `cls_prob`) to the predicted one, averaged over the masked regions of matched pairs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MaskedObjectClassification(nn.Module):
    def __init__(self, target: str = "label"):
        super().__init__()
        if target not in ("label", "distribution"):
            raise ValueError(f"MOC target must be 'label' or 'distribution', got {target!r}")
        self.target = target

    def forward(self, out, batch) -> Tensor:
        """out.moc_logits (K, C) at the target regions (row-major order of batch.region_targets)."""
        logits = out.moc_logits.float()
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        if self.target == "label":
            return F.cross_entropy(logits, batch.region_labels[batch.region_targets])
        probs = batch.region_probs[batch.region_targets].float()                # (K, C)
        return F.kl_div(F.log_softmax(logits, -1), probs, reduction="batchmean")


class MaskedRegionFeatureRegression(nn.Module):
    def forward(self, out, batch) -> Tensor:
        """out.mrfr_pred (K, F) against the unmasked features batch.region_orig at the target regions."""
        pred = out.mrfr_pred.float()
        if pred.shape[0] == 0:
            return pred.sum() * 0.0
        return F.mse_loss(pred, batch.region_orig[batch.region_targets].float())


class MaskedRegionModeling(nn.Module):
    def forward(self, out, batch) -> Tensor:
        """out.mrm_logits (K, C) at the target regions (row-major order of batch.region_targets);
        -> KL(detector distribution || softmax(logits)), summed over classes, averaged over the K regions."""
        logits = out.mrm_logits.float()
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        if batch.region_probs is None:
            raise ValueError("MRM needs the detector's class distributions (the region store's cls_prob)")
        probs = batch.region_probs[batch.region_targets].float()                # (K, C)
        return F.kl_div(F.log_softmax(logits, -1), probs, reduction="batchmean")
