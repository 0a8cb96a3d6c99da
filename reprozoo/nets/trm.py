"""The Tiny Recursive Model's network f (Jolicoeur-Martineau 2025, official SamsungSAILMontreal/TinyRecursiveModels,
sudoku variant): token and puzzle embeddings, a stack of post-norm blocks (an MLP over the sequence axis, or rotary
self-attention, then SwiGLU), and the output and halting heads. The recursion that uses it is
:class:`~reprozoo.methods.TRMModule`'s."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from reprozoo._validate import check

__all__ = ["TRMConfig", "TinyRecursiveNetwork"]


@dataclass
class TRMConfig:
    vocab_size: int = 11  # 0 pad, 1 blank, 2..10 digits 1..9
    seq_len: int = 81
    hidden_size: int = 512
    num_layers: int = 2
    expansion: float = 4.0
    mixer: Literal["mlp", "attention"] = "mlp"  # token mixing: MLP over the sequence axis, or self-attention
    num_heads: int = 8  # attention only
    rope_theta: float = 10000.0  # attention only
    puzzle_emb_len: int = 16  # prefix positions reserved for the puzzle embedding (the official sudoku value)
    puzzle_emb_ndim: int = 512  # 0: no puzzle-identifier embedding (the prefix positions stay zero)
    num_puzzle_identifiers: int = 1
    norm_eps: float = 1e-5


# ----------------------------------------------------------------------------------------------------- layers


def _trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    # Truncated at two standard deviations of the underlying normal, rescaled so that the result has `std`
    # (the JAX / official initialiser; plain trunc_normal_ would give a smaller spread).
    if std == 0:
        return tensor.zero_()
    raw = std / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=raw, a=-2 * raw, b=2 * raw)


def _linear(d_in: int, d_out: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    _trunc_normal_(layer.weight.data, std=d_in**-0.5)  # truncated LeCun normal
    if bias:
        layer.bias.data.zero_()
    return layer


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # no learnable scale, computed in fp32 (as the official code)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, expansion: float):
        super().__init__()
        inner = -(-round(expansion * dim * 2 / 3) // 256) * 256  # rounded up to a multiple of 256
        self.gate_up = _linear(dim, 2 * inner)
        self.down = _linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _RotaryAttention(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"TRM: hidden_size {cfg.hidden_size} must be divisible by num_heads {cfg.num_heads}")
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = _linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = _linear(cfg.hidden_size, cfg.hidden_size)
        positions = cfg.seq_len + cfg.puzzle_emb_len
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(positions).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (S, head_dim), rotate-half layout
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rope(self, t: torch.Tensor) -> torch.Tensor:  # (B, H, S, hd)
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * self.cos.to(t.dtype) + rotated * self.sin.to(t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        attended = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v)  # non-causal
        return self.out(attended.transpose(1, 2).reshape(b, s, d))


class _Block(nn.Module):
    """Post-norm block: token mixing, then a channel SwiGLU, each followed by RMSNorm without scale."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.mixer_kind, self.eps = cfg.mixer, cfg.norm_eps
        if cfg.mixer == "mlp":
            # MLP-mixer over the sequence axis (P + L tokens); its residual norm is taken over that axis too.
            self.token_mlp = _SwiGLU(cfg.seq_len + cfg.puzzle_emb_len, cfg.expansion)
        else:
            self.attention = _RotaryAttention(cfg)
        self.channel_mlp = _SwiGLU(cfg.hidden_size, cfg.expansion)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, S, D)
        if self.mixer_kind == "mlp":
            t = h.transpose(1, 2)  # (B, D, S)
            h = _rms_norm(t + self.token_mlp(t), self.eps).transpose(1, 2)
        else:
            h = _rms_norm(h + self.attention(h), self.eps)
        return _rms_norm(h + self.channel_mlp(h), self.eps)


# ----------------------------------------------------------------------------------------------------- network


class TinyRecursiveNetwork(nn.Module):
    """The network f with its input embedding, output head and halting head; no training logic.

    The defaults are the official sudoku MLP model (``arch/trm.yaml`` with ``mlp_t: true``): 512 channels, 2 blocks,
    SwiGLU expansion 4, a 16-position puzzle-embedding prefix. ``num_heads`` and ``rope_theta`` are used with
    ``mixer="attention"`` only; ``puzzle_emb_ndim=0`` leaves the prefix positions zero. ``config`` holds the
    arguments, as :class:`~reprozoo.methods.TRMModule` records them."""

    def __init__(
        self,
        *,
        vocab_size: int = 11,
        seq_len: int = 81,
        hidden_size: int = 512,
        num_layers: int = 2,
        expansion: float = 4.0,
        mixer: Literal["mlp", "attention"] = "mlp",
        num_heads: int = 8,
        rope_theta: float = 10000.0,
        puzzle_emb_len: int = 16,
        puzzle_emb_ndim: int = 512,
        num_puzzle_identifiers: int = 1,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        for field, value in {
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_puzzle_identifiers": num_puzzle_identifiers,
        }.items():
            check(isinstance(value, int) and value >= 1, "TinyRecursiveNetwork", field, value, "an integer >= 1")
        check(expansion > 0, "TinyRecursiveNetwork", "expansion", expansion, "> 0")
        check(mixer in ("mlp", "attention"), "TinyRecursiveNetwork", "mixer", mixer, "'mlp' or 'attention'")
        check(puzzle_emb_len >= 0, "TinyRecursiveNetwork", "puzzle_emb_len", puzzle_emb_len, ">= 0")
        check(
            0 <= puzzle_emb_ndim <= puzzle_emb_len * hidden_size,
            "TinyRecursiveNetwork",
            "puzzle_emb_ndim",
            puzzle_emb_ndim,
            f"in [0, puzzle_emb_len * hidden_size = {puzzle_emb_len * hidden_size}]",
        )
        self.cfg = cfg = TRMConfig(
            vocab_size=vocab_size,
            seq_len=seq_len,
            hidden_size=hidden_size,
            num_layers=num_layers,
            expansion=expansion,
            mixer=mixer,
            num_heads=num_heads,
            rope_theta=rope_theta,
            puzzle_emb_len=puzzle_emb_len,
            puzzle_emb_ndim=puzzle_emb_ndim,
            num_puzzle_identifiers=num_puzzle_identifiers,
            norm_eps=norm_eps,
        )
        d = cfg.hidden_size
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        _trunc_normal_(self.embed_tokens.weight.data, std=1 / self.embed_scale)
        if cfg.puzzle_emb_ndim > 0:
            self.puzzle_emb = nn.Embedding(cfg.num_puzzle_identifiers, cfg.puzzle_emb_ndim)
            self.puzzle_emb.weight.data.zero_()  # zero init, as the official sparse embedding
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = _linear(d, cfg.vocab_size)
        self.q_head = _linear(d, 2, bias=True)  # [halt, continue] logits; TRM uses only "halt"
        self.q_head.weight.data.zero_()
        self.q_head.bias.data.fill_(-5.0)  # start by never halting
        # Fixed random initial answer and latent (not trained; saved with the weights).
        self.register_buffer("y_init", _trunc_normal_(torch.empty(d), std=1.0))
        self.register_buffer("z_init", _trunc_normal_(torch.empty(d), std=1.0))

    @property
    def config(self) -> dict:
        """The keyword arguments that build this network again."""
        return dataclasses.asdict(self.cfg)

    def embed(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor | None = None) -> torch.Tensor:
        """x: scaled token embeddings behind the puzzle prefix. inputs (B, L) -> (B, P + L, D)"""
        b = inputs.shape[0]
        tokens = self.embed_tokens(inputs)  # (B, L, D)
        prefix = tokens.new_zeros(b, self.cfg.puzzle_emb_len * self.cfg.hidden_size)
        if self.cfg.puzzle_emb_ndim > 0:
            ids = puzzle_identifiers if puzzle_identifiers is not None else inputs.new_zeros(b)
            prefix[:, : self.cfg.puzzle_emb_ndim] = self.puzzle_emb(ids.reshape(b))
        prefix = prefix.view(b, self.cfg.puzzle_emb_len, self.cfg.hidden_size)
        return self.embed_scale * torch.cat([prefix, tokens], dim=1)

    def initial_state(self, batch_size: int, generator: torch.Generator | None = None, random: bool = False):
        """(y, z), each (B, S, D): the fixed buffers, or fresh random ones (best-of-k)."""
        shape = (batch_size, self.cfg.seq_len + self.cfg.puzzle_emb_len, self.cfg.hidden_size)
        if not random:
            return self.y_init.expand(shape).clone(), self.z_init.expand(shape).clone()
        y = torch.randn(batch_size, 1, shape[2], generator=generator, device=self.y_init.device).expand(shape)
        z = torch.randn(batch_size, 1, shape[2], generator=generator, device=self.y_init.device).expand(shape)
        return y.to(self.y_init.dtype).clone(), z.to(self.z_init.dtype).clone()

    def f(self, h: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        h = h + injection
        for block in self.blocks:
            h = block(h)
        return h

    def latent_recursion(self, x, y, z, n: int):
        for _ in range(n):
            z = self.f(z, y + x)
        return self.f(y, z), z

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, n: int, T: int):
        """One supervision step: T - 1 recursions without gradient, one with.
        Returns (y, z) detached for the next step, logits (B, L, V) and the halting logit (B,)."""
        with torch.no_grad():
            for _ in range(T - 1):
                y, z = self.latent_recursion(x, y, z, n)
        y, z = self.latent_recursion(x, y, z, n)
        logits = self.lm_head(y)[:, self.cfg.puzzle_emb_len :]
        q_halt = self.q_head(y[:, 0]).float()[:, 0]  # read at the first prefix position
        return (y.detach(), z.detach()), logits, q_halt
