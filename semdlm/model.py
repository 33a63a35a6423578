"""Bidirectional transformer denoiser f_theta(x_t, t) -> logits of p_theta(x_0 | x_t) (x0-parameterisation).

Rotary position embeddings, adaLN time conditioning (shift / scale / gate per block, zero-initialised so
every block starts as the identity), weight-tied output head, ``scaled_dot_product_attention``.

``Denoiser.for_kernel`` builds the network of a kernel from the ``model`` section; ``save`` writes it as
``model.pt`` (its architecture and any run information under "meta", the CPU weights under "state_dict") and
``Denoiser.load`` reads that file back without unpickling code.

The latent-state model (``num_states > 0``) also embeds each token's latent state (``semdlm.kernels``: clean,
global jump, neighbour slot). The kernel restricts the output to the x_0 consistent with what the model sees
(``Kernel.constrain``: carry-over of known-clean positions, MDLM's SUBS, and the neighbour-slot preimage).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from semdlm.config import ModelConfig

if TYPE_CHECKING:
    from semdlm.kernels import Kernel


def rotary_tables(seq_len: int, head_dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)  # [L, hd/2]
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the head dimension by position-dependent angles; x is [B, H, L, hd]. One complex
    multiply (x1 + i x2)(cos + i sin) instead of strided slices, four products and a stack."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d)
        )
        self.ada = nn.Linear(cfg.cond_dim or d, 6 * d)  # shift1, scale1, gate1, shift2, scale2, gate2
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop).transpose(1, 2).reshape(B, L, d)
        x = x + (1 + g1) * F.dropout(self.proj(a), drop, self.training)
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + (1 + g2) * F.dropout(self.mlp(h), drop, self.training)


class Denoiser(nn.Module):
    """x0-prediction network. For an absorbing kernel the [MASK] logit is -inf (it is never a clean token)."""

    def __init__(self, vocab_size: int, seq_len: int, cfg: ModelConfig, mask_id: int | None = None,
                 num_states: int = 0) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.seq_len, self.mask_id = cfg, vocab_size, seq_len, mask_id
        self.num_states = num_states
        d, c = cfg.d_model, cfg.cond_dim or cfg.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.state_embed = nn.Embedding(num_states, d) if num_states else None
        self.time = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.ada_out = nn.Linear(c, 2 * d)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        never = torch.zeros(vocab_size)
        if mask_id is not None:
            never[mask_id] = float("-inf")  # [MASK] is never a clean token
        self.register_buffer("never", never, persistent=False)
        cos, sin = rotary_tables(seq_len, d // cfg.n_heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.state_embed is not None:
            nn.init.normal_(self.state_embed.weight, std=0.02)

    @classmethod
    def for_kernel(cls, cfg: ModelConfig, kernel: Kernel, seq_len: int, latent: bool) -> Denoiser:
        """The denoiser of ``kernel``'s vocabulary (its [MASK] never predicted when it is absorbing); ``latent``:
        it also sees each token's latent state (an embedding per state of the kernel). Initialised from torch's
        global generator."""
        return cls(kernel.vocab_size, seq_len, cfg, kernel.mask_id, kernel.num_states if latent else 0)

    def save(self, path: str | Path, **meta: Any) -> None:
        """Write ``path`` (model.pt): the architecture and ``meta`` (what the run wants to record) under "meta", the
        weights, on the CPU, under "state_dict"."""
        arch = {"vocab_size": self.vocab_size, "seq_len": self.seq_len, "model": asdict(self.cfg),
                "mask_id": self.mask_id, "num_states": self.num_states}
        torch.save({"meta": {**arch, **meta}, "state_dict": {k: v.cpu() for k, v in self.state_dict().items()}},
                   path)

    @classmethod
    def load(cls, path: str | Path) -> Denoiser:
        """The model that ``save`` wrote to ``path``, on the CPU in eval mode (a weights-only load: no code runs)."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        model = cls(meta["vocab_size"], meta["seq_len"], ModelConfig(**meta["model"]), meta["mask_id"],
                    meta.get("num_states", 0))
        model.load_state_dict(blob["state_dict"])
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, xt: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of p_theta(x_0 | x_t, state) ([B, L, V] float32); ``state`` is required by (and only read by)
        the latent-state model."""
        L = xt.shape[1]
        x = self.embed(xt)
        if self.state_embed is not None:
            if state is None:
                raise ValueError("this denoiser is a latent-state model: pass the latent state of x_t")
            x = x + self.state_embed(state)
        tt = t if self.cfg.time_conditioning else torch.zeros_like(t)
        c = F.silu(self.time(timestep_embedding(tt, self.cfg.cond_dim or self.cfg.d_model)))
        for block in self.blocks:
            x = block(x, c, self.cos[:L], self.sin[:L])
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return F.linear(h, self.embed.weight, self.bias + self.never).float()  # weight-tied head, bias fused
