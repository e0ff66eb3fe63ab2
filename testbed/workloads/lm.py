"""A small causal language model (GPT-style decoder) for text datasets such as ``alpaca_synthetic``.

The reference study fine-tunes a decoder LM with dropout, where a rank's seed and data order can
actually change what it computes; the MLP cannot show that. This model is the same shape in
miniature: token + position embeddings, pre-LayerNorm blocks of causal self-attention and an MLP,
dropout on attention weights and residual branches, a tied output head. ``forward(**batch)``
returns the mean cross-entropy over the targets whose ``loss_mask`` is set (response tokens only).
"""
from __future__ import annotations

from typing import Annotated, Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from testbed.scenario.bounds import Bounds
from testbed.workloads.data import Dataset
from testbed.scenario.tables import MODELS


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """Decoder-only LM; the loss is averaged over masked-in target tokens of the whole batch."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, layers: int, heads: int,
                 mlp_ratio: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        self.apply(_init)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.tok(input_ids) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(input_ids)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        if loss_mask is None:
            return losses.mean()
        mask = loss_mask.flatten().to(losses.dtype)
        # An all-masked batch gives loss 0 and a zero gradient (the metrics flag zero_grad).
        return (losses * mask).sum() / mask.sum().clamp_min(1.0)


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _heads_divide_d_model(p: Mapping[str, Any]) -> tuple[str, str] | None:
    return None if p["d_model"] % p["heads"] == 0 else ("heads", f"a divisor of d_model ({p['d_model']})")


AtLeastOne = Annotated[int, Bounds(ge=1)]


@MODELS.register("transformer", check=_heads_divide_d_model)
def transformer(dataset: Dataset, *, d_model: AtLeastOne = 64, layers: AtLeastOne = 2, heads: AtLeastOne = 4,
                mlp_ratio: AtLeastOne = 4, dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.1) -> nn.Module:
    """Causal LM over a token dataset (needs ``info['vocab_size']`` and ``info['seq_len']``)."""
    for key in ("vocab_size", "seq_len"):
        if key not in dataset.info:
            raise ValueError(f"the transformer model needs a token dataset (info[{key!r}]), e.g. alpaca_synthetic")
    if d_model < 1 or layers < 1 or heads < 1 or d_model % heads or mlp_ratio < 1:
        raise ValueError("transformer needs d_model, layers, heads, mlp_ratio >= 1 and d_model divisible by heads")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("transformer needs 0 <= dropout < 1")
    return CausalLM(dataset.info["vocab_size"], dataset.info["seq_len"], d_model, layers, heads, mlp_ratio, dropout)


def _transformer_parameters(params: Mapping[str, Any], data: Mapping[str, Any]) -> int:
    """Parameters of ``transformer`` over a token dataset (vocabulary of bytes, its ``seq_len``)."""
    from testbed.workloads.textdata import VOCAB_SIZE

    d, layers, ratio = int(params.get("d_model", 64)), int(params.get("layers", 2)), int(params.get("mlp_ratio", 4))
    seq = int(data.get("seq_len", 128))
    block = 4 * d * d + 4 * d + 2 * ratio * d * d + (ratio + 1) * d + 4 * d
    return VOCAB_SIZE * d + seq * d + layers * block + 2 * d


transformer.batch_keys = ("input_ids", "targets")  # type: ignore[attr-defined]  # scenario/compat.py
transformer.parameter_count = _transformer_parameters  # type: ignore[attr-defined]  # engine/memory.py
transformer.size_field = "d_model"  # type: ignore[attr-defined]
