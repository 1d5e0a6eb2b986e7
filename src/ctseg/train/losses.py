"""Training loss of the paper: 0.6 * Tanimoto + 0.4 * categorical cross-entropy (smooth 1e-5).

    L_tanimoto = 1 - (sum(p*y) + s) / (sum(p^2) + sum(y^2) - sum(p*y) + s)

p are softmax probabilities, y the one-hot target. The sums run per class over the whole batch and
all voxels (the paper: the coefficient "treats each class independently" and is maximal when a class
is absent from "the current sample", i.e. the batch); the loss is the mean over classes, background
included. Cross-entropy is the mean over voxels. Both are computed in float32 (also under autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TanimotoCELoss(nn.Module):
    """``loss(logits (B, K, [Z,] Y, X), target (B, [Z,] Y, X) long in [0, K)) -> scalar``."""

    def __init__(self, tanimoto_weight: float = 0.6, ce_weight: float = 0.4, smooth: float = 1e-5):
        super().__init__()
        if tanimoto_weight < 0 or ce_weight < 0 or smooth <= 0:
            raise ValueError(f"need weights >= 0 and smooth > 0, got {tanimoto_weight}, {ce_weight}, {smooth}")
        self.tanimoto_weight, self.ce_weight, self.smooth = tanimoto_weight, ce_weight, smooth

    def extra_repr(self) -> str:
        return f"tanimoto_weight={self.tanimoto_weight}, ce_weight={self.ce_weight}, smooth={self.smooth}"

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Tanimoto loss, cross-entropy), each a scalar tensor."""
        if logits.ndim != target.ndim + 1 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"logits (B, K, *S) and target (B, *S) disagree: {tuple(logits.shape)} vs "
                             f"{tuple(target.shape)}")
        logits = logits.float()
        num_classes = logits.shape[1]
        probs = logits.softmax(1)
        onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
        dims = (0,) + tuple(range(2, logits.ndim))
        inter = (probs * onehot).sum(dims)
        denom = probs.square().sum(dims) + onehot.sum(dims) - inter  # y^2 == y for one-hot
        tanimoto = 1.0 - ((inter + self.smooth) / (denom + self.smooth)).mean()
        ce = F.cross_entropy(logits, target.long())
        return tanimoto, ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tanimoto, ce = self.terms(logits, target)
        return self.tanimoto_weight * tanimoto + self.ce_weight * ce
