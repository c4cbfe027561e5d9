"""Contrastive losses of the alignment model, on L2-normalised embeddings.

All take image embeddings ``im`` (B, D) and caption embeddings ``txt`` (B, D),
where row i of each is a positive pair, plus an optional ``positive_mask``
(B, B) bool marking *other* pairs that are also positives (two captions of one
image, or identical caption strings): those are never used as negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rvqa.errors import ConfigError


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


# --------------------------------------------------------------------------- PCME


def pcme_sample(mu: torch.Tensor, logsigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Samples ``z = mu + eps * exp(logsigma)``: (B, D) and (B, J, D) noise → (B, J, D)."""
    return mu.unsqueeze(1) + eps * logsigma.exp().unsqueeze(1)


def pcme_match_logits(
    z_im: torch.Tensor, z_txt: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """(B, J, D) × (B', J, D) samples → (B, B', J, J) logits ``s = -a·d + b``.

    ``d`` is the Euclidean distance of two samples (``sqrt(|x-y|² + 1e-6)``, as
    PCME's ``batchwise_cdist``); ``a`` = ``scale``, ``b`` = ``shift``.
    """
    b, j, d = z_im.shape
    b2 = z_txt.shape[0]
    x, y = z_im.reshape(b * j, d), z_txt.reshape(b2 * j, d)
    # |x - y|² from one matrix product: (B·J, B'·J), not a (B, B', J, J, D) difference
    sq = (x.pow(2).sum(-1)[:, None] + y.pow(2).sum(-1)[None, :] - 2 * x @ y.t()).clamp(min=0)
    dist = (sq + 1e-6).sqrt().view(b, j, b2, j).permute(0, 2, 1, 3)  # (B, B', J, J)
    return -scale * dist + shift


def pcme_match_probability(logits: torch.Tensor) -> torch.Tensor:
    """Match probability of each pair: the mean over the J × J sample pairs of
    ``σ(s) = e^s / (e^s + e^-s)`` (PCME's sigmoid, i.e. ``sigmoid(2s)``)."""
    return torch.sigmoid(2 * logits).flatten(-2).mean(-1)


def pcme_soft_contrastive_nll(logits: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """``-log p(m | x_v, x_t)`` per pair, p the match probability (or its complement).

    Args:
        logits: (B, B', J, J) sample-pair logits.
        matched: (B, B') with +1 for a matching pair, -1 otherwise.

    ``-log mean_kl σ(m·s_kl) = log J² − logsumexp_kl(m·s_kl − logsumexp(s_kl, −s_kl))``,
    computed in log space (PCME's ``soft_contrastive_nll``).
    """
    flat = logits.flatten(-2)  # (B, B', J²)
    m = matched.to(flat.dtype).unsqueeze(-1)
    log_p = m * flat - torch.logaddexp(flat, -flat)
    return math.log(flat.shape[-1]) - torch.logsumexp(log_p, dim=-1)


def gaussian_kl(mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag σ²) ‖ N(0, I)) summed over rows and dimensions (σ = exp(logsigma))."""
    return 0.5 * (mu.pow(2) + (2 * logsigma).exp() - 1 - 2 * logsigma).sum()


def pcme_loss(
    im_mu: torch.Tensor,
    im_logsigma: torch.Tensor,
    txt_mu: torch.Tensor,
    txt_logsigma: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    num_samples: int = 7,
    vib_beta: float = 1e-5,
    positive_mask: torch.Tensor | None = None,
    im_eps: torch.Tensor | None = None,
    txt_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """PCME (Chun et al., CVPR 2021): the Monte-Carlo soft contrastive loss + VIB.

    Each image and caption is a Gaussian ``N(mu, diag σ²)``; ``num_samples`` (J)
    samples of each give, for every (image, caption) pair of the batch, the match
    probability ``p = mean_kl σ(-a·‖z_v^k − z_t^l‖ + b)``. The loss is
    ``-log p`` for matching pairs (the diagonal and ``positive_mask``) and
    ``-log(1 − p)`` for the others, **summed** over all B² pairs and counted twice
    (PCME adds its image→text and text→image terms, which are equal because the
    distance is symmetric), plus ``vib_beta`` × the KL divergence of both
    modalities' Gaussians from N(0, I) (the variational information bottleneck).

    Reading of the official code (naver-ai/pcme): its KL is called with log σ
    where its formula expects log σ²; this uses the KL of the Gaussian it samples
    from. ``im_eps`` / ``txt_eps`` ((B, J, D) standard normal noise) make the loss
    deterministic (tests); by default fresh noise is drawn.
    """
    b, d = im_mu.shape
    if im_eps is None:
        im_eps = torch.randn(b, num_samples, d, device=im_mu.device, dtype=im_mu.dtype)
    if txt_eps is None:
        txt_eps = torch.randn(
            txt_mu.shape[0], num_samples, d, device=txt_mu.device, dtype=txt_mu.dtype
        )
    z_im = pcme_sample(im_mu, im_logsigma, im_eps)
    z_txt = pcme_sample(txt_mu, txt_logsigma, txt_eps)
    logits = pcme_match_logits(z_im, z_txt, scale, shift)
    matched = _positives(b, positive_mask, im_mu.device).to(im_mu.dtype) * 2 - 1
    nll = pcme_soft_contrastive_nll(logits, matched).sum()
    kl = gaussian_kl(im_mu, im_logsigma) + gaussian_kl(txt_mu, txt_logsigma)
    return 2 * nll + vib_beta * kl


def pcme_uncertainty(logsigma: torch.Tensor) -> torch.Tensor:
    """One uncertainty per embedding: the geometric mean of its variances,
    ``exp(mean_d log σ_d²)`` (ranks inputs like PCME's logged mean log σ)."""
    return (2 * logsigma).mean(-1).exp()


def _positives(b: int, positive_mask: torch.Tensor | None, device) -> torch.Tensor:
    """(B, B) bool: the diagonal and the extra positives."""
    return ~_negatives_mask(b, positive_mask, device)


# --------------------------------------------------------------------------- centre loss


def cross_modal_center_loss(
    im: torch.Tensor,
    txt: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    im_logits: torch.Tensor,
    txt_logits: torch.Tensor,
    *,
    center_weight: float = 10.0,
    mse_weight: float = 0.1,
) -> torch.Tensor:
    """Cross-modal centre loss (Jing et al., WACV 2021), its whole objective.

    ``CE(head(f_v), y) + CE(head(f_t), y) + λ·L_c + w·MSE(f_v, f_t)`` with one
    classifier head shared by both modalities (``im_logits``, ``txt_logits``), the
    centre term ``L_c = 1/(2B) Σ_i Σ_m ‖f_i^m − c_{y_i}‖²`` pulling both modalities'
    features of a class to one shared, learned centre, and the mean squared error
    between the two modalities' features of each pair (``nn.MSELoss``: mean over
    B × D). Defaults are the official code's: λ = 10, w = 0.1.
    """
    ce = F.cross_entropy(im_logits, labels) + F.cross_entropy(txt_logits, labels)
    c = centers[labels]  # (B, D)
    center = ((im - c).pow(2).sum(-1).mean() + (txt - c).pow(2).sum(-1).mean()) / 2
    return ce + center_weight * center + mse_weight * F.mse_loss(im, txt)


# --------------------------------------------------------------------------- GPLDAN


def graph_pattern_loss(
    im_multi: torch.Tensor,
    txt_multi: torch.Tensor,
    *,
    margin: float = 0.2,
    diversity_weight: float = 0.1,
    max_violation: bool = True,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Graph pattern loss over K representations per instance (GPLDAN, our reading).

    ``im_multi`` / ``txt_multi``: (B, K, D) L2-normalised representations from the
    diversified attention projector. The graph of a pair holds every distance
    between one side's K representations and the other's: for each of the K × K
    (k, l) pairings the VSE++ hardest-negative hinge over the batch (similarities
    ``s_ij^kl = <v_i^k, t_j^l>``) is taken, and the K² hinges are averaged
    (``max_violation=False``: the sum over negatives, as the model does during
    ``max_violation_warmup``: hardest negatives from a random start collapse the
    embeddings, as with VSE++). The same hinge on the fused embeddings (the
    normalised mean of the K: what the index holds and searches) is added, so the
    score retrieval uses is trained too. The intra-instance edges keep the K
    representations diverse: ``diversity_weight · Σ_i ‖V_i V_iᵀ − I‖²_F / K²`` for
    both modalities.
    """
    b, k, _ = im_multi.shape
    # the fused embedding (what the index holds): the normalised mean of the K
    fused = vse_hinge_loss(
        F.normalize(im_multi.mean(1), dim=-1),
        F.normalize(txt_multi.mean(1), dim=-1),
        margin,
        max_violation,
        positive_mask,
    )
    scores = torch.einsum("ikd,jld->klij", im_multi, txt_multi)  # (K, K, B, B)
    diag = scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (K, K, B, 1)
    neg = _negatives_mask(b, positive_mask, im_multi.device)
    cost_txt = (margin + scores - diag).clamp(min=0) * neg
    cost_im = (margin + scores - diag.transpose(-1, -2)).clamp(min=0) * neg
    if max_violation:
        cost_txt, cost_im = cost_txt.amax(dim=-1).sum(-1), cost_im.amax(dim=-2).sum(-1)
    else:
        cost_txt, cost_im = cost_txt.sum((-1, -2)), cost_im.sum((-1, -2))
    hinge = (cost_txt + cost_im).mean() + fused
    eye = torch.eye(k, device=im_multi.device, dtype=im_multi.dtype)
    div = sum(
        (v @ v.transpose(1, 2) - eye).pow(2).sum((1, 2)).sum() / k**2 for v in (im_multi, txt_multi)
    )
    return hinge + diversity_weight * div


def modality_loss(im_logits: torch.Tensor, txt_logits: torch.Tensor) -> torch.Tensor:
    """The modality classifier's cross-entropy: image features are class 1, text 0.

    ``im_logits`` / ``txt_logits``: (B,) or (B, K) logits. With the gradient-reversal
    layer in front of the classifier (``modality_adversarial``), minimising this
    trains the classifier while the towers learn to make the modalities
    indistinguishable.
    """
    return 0.5 * (
        F.binary_cross_entropy_with_logits(im_logits, torch.ones_like(im_logits))
        + F.binary_cross_entropy_with_logits(txt_logits, torch.zeros_like(txt_logits))
    )


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient times ``-lambda`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer."""
    return GradReverse.apply(x, lam)


# --------------------------------------------------------------------------- CRCGS


def _supcon(sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Supervised contrastive loss within one modality (self excluded everywhere).

    ``sim``: (B, B) similarities / T; ``positives``: (B, B) bool. Anchors without a
    positive are skipped; 0 when none has one.
    """
    b = sim.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    log_prob = sim - sim.masked_fill(eye, float("-inf")).logsumexp(dim=1, keepdim=True)
    pos = positives & ~eye
    count = pos.sum(1)
    has = count > 0
    if not has.any():
        return sim.new_zeros(())
    per_anchor = (log_prob.masked_fill(~pos, 0).sum(1)[has]) / count[has]
    return -per_anchor.mean()


def crcgs_contrastive_loss(
    im: torch.Tensor,
    txt: torch.Tensor,
    same_category: torch.Tensor,
    *,
    temperature: float = 0.07,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CRCGS's inter- and intra-modality contrastive terms (our reading, no teachers).

    The mean of four terms, as CRCGS averages its four: image→text and text→image
    InfoNCE at a fixed temperature (extra positives out of the denominators), and
    within each modality a supervised contrastive term whose positives are the
    other items of the same semantic category (``same_category``, (B, B) bool).
    CRCGS contrasts against frozen generative "teacher" features; without them the
    intra-modality positives come from the categories (README, "Retrieval
    objectives").
    """
    b = im.shape[0]
    logits = (im @ txt.t()) / temperature
    neg = _negatives_mask(b, positive_mask, im.device)
    keep = neg | torch.eye(b, dtype=torch.bool, device=im.device)
    logits = logits.masked_fill(~keep, float("-inf"))
    target = torch.arange(b, device=im.device)
    inter = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
    intra = _supcon((im @ im.t()) / temperature, same_category) + _supcon(
        (txt @ txt.t()) / temperature, same_category
    )
    return (inter + intra) / 4


def support_set_loss(
    im: torch.Tensor,
    txt: torch.Tensor,
    same_category: torch.Tensor,
    *,
    temperature: float = 0.07,
) -> torch.Tensor:
    """CRCGS's support-set regularisation.

    Each image's support set is the batch's captions of its category, weighted by
    ``W = exp(cos(v, t)/T) ⊙ same_category`` (``same_category`` must hold on the
    diagonal); ``v_sup = Σ_k W_nk t_k / Σ_k W_nk``
    (and ``t_sup`` from the images, with Wᵀ). The loss pulls each item to its
    cross-modal support: ``-log(½ (mean_n cos(v_n, v_sup_n) + mean_n cos(t_n, t_sup_n)))``,
    the argument clamped at 1e-6 (a negative mean cosine early in training would
    give no logarithm).
    """
    logits = ((im @ txt.t()) / temperature).masked_fill(~same_category.bool(), float("-inf"))
    # W normalised per row (per column for the captions): softmax, no exp overflow at small T
    im_sup = logits.softmax(dim=1) @ txt
    txt_sup = logits.softmax(dim=0).t() @ im
    agree = 0.5 * (
        F.cosine_similarity(im, im_sup, dim=-1).mean()
        + F.cosine_similarity(txt, txt_sup, dim=-1).mean()
    )
    return -agree.clamp(min=1e-6).log()


# --------------------------------------------------------------------------- hashing


def hash_loss(
    im_codes: torch.Tensor,
    txt_codes: torch.Tensor,
    *,
    gamma: float = 1.0,
    eta: float = 1.0,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deep cross-modal hashing (DCMH, Jiang & Li CVPR 2017) on tanh-relaxed codes.

    ``im_codes`` F, ``txt_codes`` G: (B, b) in (−1, 1). With ``θ_ij = ½ F_i·G_j`` and
    ``S_ij = 1`` for matching pairs (the diagonal and ``positive_mask``):

    * likelihood ``ℓ_ij = log(1 + e^θ_ij) − S_ij θ_ij``, averaged over the matching
      pairs and over the others, and the two means averaged;
    * quantisation ``γ · mean_i (‖F_i − B_i‖² + ‖G_i − B_i‖²) / b`` with the pair's
      binary code ``B_i = sign(F_i + G_i)`` (no gradient);
    * bit balance ``η · (‖mean_i F_i‖² + ‖mean_i G_i‖²) / b``.

    DCMH sums each term over the whole training set and fits B per epoch; here each
    is a per-element mean over the batch, so γ = η = 1 (DCMH's defaults) keep their
    relative weight at any batch size and code length. The likelihood weighs matching
    and non-matching pairs equally (HashNet's weighting, Cao et al. 2017): in a batch
    only B of B² pairs match, and with the plain mean every code collapsed to one
    shared code on a fixed batch (``tests/test_retrieval_objectives.py``).
    """
    b_bits = im_codes.shape[1]
    theta = 0.5 * im_codes @ txt_codes.t()
    s = _positives(im_codes.shape[0], positive_mask, im_codes.device).to(theta.dtype)
    per_pair = F.softplus(theta) - s * theta
    nll = 0.5 * (
        (per_pair * s).sum() / s.sum() + (per_pair * (1 - s)).sum() / (1 - s).sum().clamp(min=1)
    )
    codes = torch.sign(im_codes + txt_codes).detach()
    quant = ((im_codes - codes).pow(2).sum(1) + (txt_codes - codes).pow(2).sum(1)).mean() / b_bits
    balance = (im_codes.mean(0).pow(2).sum() + txt_codes.mean(0).pow(2).sum()) / b_bits
    return nll + gamma * quant + eta * balance


# --------------------------------------------------------------------------- Yu et al.


def pairwise_similarity_loss(
    im: torch.Tensor,
    txt: torch.Tensor,
    *,
    lam: float = 0.35,
    margin: float = 0.8,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Yu et al.'s pairwise similarity loss (the dual-path GCN model, arXiv:1802.00985).

    A loss on the two *distributions* of similarities rather than on single pairs:
    with ``s_ij = <v_i, t_j>`` over all B² (image, caption) pairs of the batch, the
    matching pairs P (the diagonal and ``positive_mask``) and the others N have means
    ``μ+``, ``μ-`` and (population) variances ``σ²+``, ``σ²-``, and

    ``L = (σ²+ + σ²-) + λ · max(0, m − (μ+ − μ-))``:

    both distributions made narrow and their means at least ``m`` apart (Kumar BG et
    al.'s global loss, which Yu et al. adopt). Defaults are their code's (SCKR,
    ``train.py``): λ = 0.35, m = 0.8; their similarity is a learned score of the two
    descriptors, here the cosine the index searches. A batch without a non-matching
    pair gives ``σ²+`` alone.
    """
    scores = im @ txt.t()  # (B, B)
    pos = _positives(scores.shape[0], positive_mask, scores.device)
    s_pos, s_neg = scores[pos], scores[~pos]
    mu_pos = s_pos.mean()
    var_pos = (s_pos - mu_pos).pow(2).mean()
    if s_neg.numel() == 0:
        return var_pos
    mu_neg = s_neg.mean()
    var_neg = (s_neg - mu_neg).pow(2).mean()
    return var_pos + var_neg + lam * (margin - (mu_pos - mu_neg)).clamp(min=0)


# --------------------------------------------------------------------------- composition

LOSS_TERMS = {
    "vse_max": "VSE++ hinge, hardest negative (Faghri et al. 2018; the DXR objective)",
    "vse_sum": "VSE hinge summed over all negatives (VSE0)",
    "infonce": "symmetric InfoNCE, learnable temperature (CLIP)",
    "pcme": "probabilistic embeddings, MC soft contrastive + VIB (Chun et al. 2021)",
    "center": "cross-modal centre loss + shared classifier + MSE (Jing et al. 2021)",
    "gpl": "GPLDAN graph pattern loss over K diversified-attention representations",
    "modality": "GPLDAN modality classifier (gradient reversal by default)",
    "crcgs": "CRCGS inter- and intra-modality contrastive terms",
    "support_set": "CRCGS support-set regularisation",
    "hash": "DCMH hashing: tanh-relaxed codes, likelihood + quantisation + balance",
    "pairwise": "pairwise similarity loss: variances + mean-gap hinge (Yu et al. 2018)",
}
# Terms that cannot train a retriever alone (they shape embeddings another term matches).
AUXILIARY_TERMS = ("modality", "support_set")
# Terms that need a semantic category per caption.
TERMS_NEEDING_LABELS = ("center",)
# Terms that read categories where known (instances: the same image or caption, otherwise).
LABEL_TERMS = ("center", "crcgs", "support_set")
# Pairs that cannot be combined.
EXCLUSIVE_TERMS = (
    ("vse_max", "vse_sum"),
    ("pcme", "hash"),
    ("pcme", "gpl"),
)


def parse_loss(spec: str) -> tuple[str, ...]:
    """``"infonce+center"`` → ``("infonce", "center")``, checked.

    Raises:
        ConfigError: Not a string, an unknown term (the known ones listed), a term
            twice, an exclusive pair, or only auxiliary terms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"loss must be a non-empty string like 'infonce+center', got {spec!r}")
    terms = tuple(t.strip() for t in spec.split("+"))
    unknown = [t for t in terms if t not in LOSS_TERMS]
    if unknown:
        raise ConfigError(
            f"unknown loss term {unknown[0]!r} in loss {spec!r}; known terms: "
            f"{', '.join(LOSS_TERMS)} (combine with '+', e.g. 'infonce+center')"
        )
    if len(set(terms)) != len(terms):
        raise ConfigError(f"loss {spec!r} names a term twice")
    for a, b in EXCLUSIVE_TERMS:
        if a in terms and b in terms:
            raise ConfigError(f"loss {spec!r}: {a!r} and {b!r} cannot be combined")
    if all(t in AUXILIARY_TERMS for t in terms):
        raise ConfigError(
            f"loss {spec!r} has only auxiliary terms ({', '.join(terms)}); add a matching "
            f"term, e.g. 'infonce+{terms[0]}'"
        )
    return terms
