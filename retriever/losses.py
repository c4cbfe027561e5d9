"""Contrastive losses of the alignment model, on L2-normalised embeddings.

All take image embeddings ``im`` (B, D) and caption embeddings ``txt`` (B, D),
where row i of each is a positive pair, plus an optional ``positive_mask``
(B, B) bool marking *other* pairs that are also positives (two captions of one
image, or identical caption strings): those are never used as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _negatives_mask(b: int, positive_mask: torch.Tensor | None, device) -> torch.Tensor:
    """(B, B) bool, True where (i, j) may serve as a negative."""
    neg = ~torch.eye(b, dtype=torch.bool, device=device)
    if positive_mask is not None:
        if positive_mask.shape != (b, b):
            raise ValueError(f"positive_mask must be ({b}, {b}), got {tuple(positive_mask.shape)}")
        neg &= ~positive_mask.to(device=device, dtype=torch.bool)
    return neg


def vse_hinge_loss(
    im: torch.Tensor,
    txt: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """VSE++ hinge loss (Faghri et al. 2018), the DXR retriever objective.

    For each positive pair (i, i) with similarity s_ii, every negative caption j
    costs ``max(0, margin + s_ij - s_ii)`` and every negative image j costs
    ``max(0, margin + s_ji - s_ii)``. ``max_violation=True`` keeps only the
    hardest negative of each kind (VSE++); ``False`` sums all of them (VSE0).
    Summed over the batch, as in the VSE++ reference code.
    """
    scores = im @ txt.t()  # (B, B): images × captions
    diag = scores.diagonal().view(-1, 1)  # (B, 1)
    neg = _negatives_mask(scores.shape[0], positive_mask, scores.device)
    cost_txt = (margin + scores - diag).clamp(min=0) * neg  # image i vs caption j
    cost_im = (margin + scores - diag.t()).clamp(min=0) * neg  # caption j vs image i
    if max_violation:
        return cost_txt.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()
    return cost_txt.sum() + cost_im.sum()


def info_nce_loss(
    im: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): mean of image→text and text→image cross-entropy.

    ``logit_scale`` is log(1/temperature), learned; it is clamped to ln(100) as in CLIP.
    Extra positives in ``positive_mask`` are removed from the softmax denominators.
    """
    scale = logit_scale.clamp(max=4.6052).exp()
    logits = scale * (im @ txt.t())  # (B, B)
    b = logits.shape[0]
    neg = _negatives_mask(b, positive_mask, logits.device)
    keep = neg | torch.eye(b, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(~keep, float("-inf"))
    target = torch.arange(b, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def retrieval_loss(
    name: str,
    im: torch.Tensor,
    txt: torch.Tensor,
    *,
    margin: float,
    logit_scale: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch on the configured loss name."""
    if name == "vse_max":
        return vse_hinge_loss(im, txt, margin, True, positive_mask)
    if name == "vse_sum":
        return vse_hinge_loss(im, txt, margin, False, positive_mask)
    if name == "infonce":
        return info_nce_loss(im, txt, logit_scale, positive_mask)
    raise ValueError(f"unknown loss {name!r}; expected vse_max, vse_sum or infonce")
