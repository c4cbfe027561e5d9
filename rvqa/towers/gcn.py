"""A graph convolutional text tower: each caption a graph of its words (Yu et al. 2018).

The text path of the dual-path model of Yu et al., "Modeling Text with Graph
Convolutional Network for Cross-Modal Information Retrieval" (PCM 2018,
arXiv:1802.00985) and "Semantic Modeling of Textual Relationship in Cross-Modal
Retrieval" (KSEM 2019, arXiv:1810.13151): words are the nodes of a graph whose edges
join words with similar word embeddings, and a Graph Convolutional Network reads it.

Where the papers build one k-nearest-neighbour graph over the whole vocabulary (node
features: a text's bag-of-words values), this tower builds one graph per caption over
its own tokens, so it takes the tokenizer's ``input_ids`` / ``attention_mask`` like
any ``transformers`` text encoder and returns ``last_hidden_state`` (B, L, H) — the
retriever pools it exactly as it pools BERT's token states:

1. node features ``X`` (L, E): the word vectors of the caption's tokens (an embedding
   table; the retriever copies a shipped backbone's input embeddings into it —
   ``'minilm'``: all-MiniLM-L6-v2's ``embeddings.word_embeddings``);
2. adjacency ``A`` (L, L) from the cosine similarity ``S = X̂ X̂ᵀ`` of the unit word
   vectors, among the caption's real tokens only (:func:`word_graph`):
   ``graph="knn"``: ``A_ij = 1`` when j is one of the ``k`` most similar other tokens
   of i, symmetrised (``A ← max(A, Aᵀ)``); ``graph="threshold"``: ``A_ij = 1`` when
   ``S_ij ≥ threshold`` (i ≠ j). Binary edges, built without gradient;
3. Kipf & Welling's renormalised propagation (:func:`normalized_adjacency`):
   ``Â = D^-1/2 (A + I) D^-1/2``, ``D_ii = Σ_j (A + I)_ij`` (without ``self_loops``:
   ``D^-1/2 A D^-1/2``);
4. ``num_layers`` graph convolutions ``H⁽ˡ⁺¹⁾ = ReLU(Â · dropout(H⁽ˡ⁾) · W⁽ˡ⁾ + b⁽ˡ⁾)``,
   ``H⁽⁰⁾ = LayerNorm(X)`` (``input_norm``; else ``X``), the first ``word_dim →
   hidden_size``, the others ``hidden_size → hidden_size``.

The LayerNorm of the node features (learned gain and bias, as BERT normalises its
embeddings) is ours, not the papers': it gives the convolutions inputs of one scale
whatever table the word vectors come from (MiniLM's rows have norm ~1, a small random
BERT's ~0.1). Without it, InfoNCE on the fixed batch of ``tests/test_gcn_text.py``
(the tiny random BERT's table) collapsed every caption to one embedding within five
steps and stayed there.

Padding tokens are no nodes: their rows and columns of ``A`` and ``Â`` are zero (no
self loop either) and their output states are zero, so a caption's states do not
depend on what it is batched with. The tokenizer's special tokens (``[CLS]``,
``[SEP]``) are nodes like the words, joined to the words nearest their vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from rvqa.errors import ConfigError

GRAPHS = ("knn", "threshold")


class GCNTextConfig(PretrainedConfig):
    """Configuration of :class:`GCNTextModel`.

    Args:
        vocab_size: Rows of the word-vector table (the tokenizer's vocabulary).
        word_dim: Width of a word vector, E (MiniLM: 384).
        hidden_size: Width of every graph convolution's output, H (the tower's output).
        num_layers: Graph convolutions, applied in turn.
        graph: ``"knn"`` (each token joined to its ``k`` most similar tokens,
            symmetrised) or ``"threshold"`` (tokens joined when their cosine
            similarity is at least ``threshold``).
        k: ``knn``: neighbours per token (fewer in a caption of ``k`` tokens or less).
        threshold: ``threshold``: the cosine similarity, in [-1, 1], at which two
            tokens are joined.
        self_loops: Add ``I`` to the adjacency before the normalisation (Kipf &
            Welling's renormalisation trick): a node keeps its own features.
        dropout: Dropout on each layer's input features, in training.
        input_norm: LayerNorm the word vectors before the first convolution (module
            docstring); ``False``: the papers' raw features.
        pad_token_id: The padding token's id (its word vector stays zero).
    """

    model_type = "rvqa-gcn-text"

    def __init__(
        self,
        vocab_size: int = 30522,
        word_dim: int = 384,
        hidden_size: int = 384,
        num_layers: int = 2,
        graph: str = "knn",
        k: int = 4,
        threshold: float = 0.5,
        self_loops: bool = True,
        dropout: float = 0.1,
        input_norm: bool = True,
        pad_token_id: int | None = 0,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("word_dim", word_dim),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("k", k),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"GCN text tower: {name} must be a positive integer, got {value!r}"
                )
        if graph not in GRAPHS:
            raise ConfigError(
                f"GCN text tower: graph must be one of {', '.join(GRAPHS)}; got {graph!r}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"GCN text tower: threshold must be a number, got {threshold!r}")
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(
                f"GCN text tower: threshold is a cosine similarity, in [-1, 1]; got {threshold!r}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ConfigError(f"GCN text tower: dropout must be a number, got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"GCN text tower: dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.graph = graph
        self.k = k
        self.threshold = float(threshold)
        self.self_loops = bool(self_loops)
        self.dropout = float(dropout)
        self.input_norm = bool(input_norm)
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def word_graph(
    vectors: torch.Tensor,
    mask: torch.Tensor,
    *,
    graph: str = "knn",
    k: int = 4,
    threshold: float = 0.5,
) -> torch.Tensor:
    """The binary, symmetric adjacency of each caption's words, without self loops.

    Args:
        vectors: (B, L, E) word vectors.
        mask: (B, L) bool (or 0/1), True at real tokens; padding is no node.
        graph: ``"knn"`` or ``"threshold"`` (module docstring).
        k: ``knn``: neighbours per token; ties are broken by ``torch.topk``.
        threshold: ``threshold``: the cosine similarity at which tokens are joined.

    Returns:
        (B, L, L) float32 of 0 and 1: ``A_ij = 1`` for an edge between tokens i and j.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}; got {graph!r}")
    mask = mask.bool()
    b, n, _ = vectors.shape
    unit = F.normalize(vectors.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (B, L, L) cosine similarities
    eye = torch.eye(n, dtype=torch.bool, device=vectors.device)
    valid = mask[:, :, None] & mask[:, None, :] & ~eye  # pairs of distinct real tokens
    if graph == "threshold":
        return ((sim >= threshold) & valid).float()
    kk = min(k, n - 1)
    adj = torch.zeros(b, n, n, device=vectors.device)
    if kk < 1:
        return adj
    top = sim.masked_fill(~valid, float("-inf")).topk(kk, dim=-1)
    # a row with fewer than k other real tokens picks -inf entries: no edges there
    adj.scatter_(-1, top.indices, torch.isfinite(top.values).float())
    return torch.maximum(adj, adj.transpose(1, 2))


def normalized_adjacency(
    adj: torch.Tensor, mask: torch.Tensor, *, self_loops: bool = True
) -> torch.Tensor:
    """Kipf & Welling's ``Â = D^-1/2 (A + I) D^-1/2`` (``D_ii = Σ_j (A + I)_ij``).

    Args:
        adj: (B, L, L) symmetric adjacency (:func:`word_graph`).
        mask: (B, L), True at real tokens: the self loops are added there only, so
            padding rows and columns of ``Â`` stay zero.
        self_loops: ``False``: ``D^-1/2 A D^-1/2`` (a node without edges then has a
            zero row).

    Returns:
        (B, L, L) float32.
    """
    mask = mask.bool()
    a = adj.float()
    if self_loops:
        a = a + torch.diag_embed(mask.float())
    deg = a.sum(-1)  # (B, L)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    return inv_sqrt[:, :, None] * a * inv_sqrt[:, None, :]


class GraphConvolution(nn.Module):
    """One GCN layer without its activation: ``Â H W + b`` (B, L, d_in) → (B, L, d_out).

    The bias is added after the propagation (Kipf & Welling's layer), not propagated.
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weight (Kipf & Welling's initialisation), zero bias."""
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
        return a_hat.to(h.dtype) @ (h @ self.weight.to(h.dtype)) + self.bias.to(h.dtype)


class GCNTextModel(PreTrainedModel):
    """Word vectors → a similarity graph per caption → GCN → token states (B, L, H)."""

    config_class = GCNTextConfig
    base_model_prefix = "gcn"
    main_input_name = "input_ids"

    def __init__(self, config: GCNTextConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(
            config.vocab_size, config.word_dim, padding_idx=config.pad_token_id
        )
        self.norm = nn.LayerNorm(config.word_dim) if config.input_norm else nn.Identity()
        dims = [config.word_dim] + [config.hidden_size] * config.num_layers
        self.layers = nn.ModuleList(GraphConvolution(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GraphConvolution):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # random word vectors until a backbone's are copied in (rvqa.towers)
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.embedding_dim))
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def adjacency(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) token ids → (B, L, L) normalised adjacency ``Â`` of each caption."""
        mask = self._mask(input_ids, attention_mask)
        return self._graph(self.embeddings(input_ids), mask)

    def _graph(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, E) word vectors → (B, L, L) ``Â``, without gradient (the edges are discrete)."""
        with torch.no_grad():
            adj = word_graph(
                words,
                mask,
                graph=self.config.graph,
                k=self.config.k,
                threshold=self.config.threshold,
            )
            return normalized_adjacency(adj, mask, self_loops=self.config.self_loops)

    @staticmethod
    def _mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
                f"input_ids {tuple(input_ids.shape)}"
            )
        return attention_mask.bool()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> BaseModelOutput:
        """(B, L) token ids and mask → ``last_hidden_state`` (B, L, H), zero at padding."""
        mask = self._mask(input_ids, attention_mask)
        words = self.embeddings(input_ids)  # (B, L, E)
        a_hat = self._graph(words, mask)  # (B, L, L), from the raw word vectors
        h = self.norm(words)
        for layer in self.layers:
            h = F.relu(layer(self.dropout(h), a_hat))  # (B, L, H)
        h = h * mask.unsqueeze(-1).to(h.dtype)  # padding is no node
        return BaseModelOutput(last_hidden_state=h)
