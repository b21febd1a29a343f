"""Small networks for single-channel digits: a time-conditioned UNet (any image size divisible by its
levels), a DiT-style transformer and a residual MLP on flat vectors (diffusion / flow matching), and
a CNN classifier for 8x8 digits (accuracy and a feature space for Fréchet distances).

Every network takes plain keyword arguments and keeps them in ``self.config`` (JSON-serialisable),
so ``build(type(net).__name__, net.config)`` rebuilds the same architecture.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsUNet", "EDMDigitsUNet", "DigitsTransformer", "VectorMLP", "DigitsClassifier", "build", "NETWORKS"]


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= ``max_groups`` dividing ``channels`` (for GroupNorm)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def sinusoidal_embedding(s: torch.Tensor, dim: int, min_freq: float = 0.1, max_freq: float = 1000.0) -> torch.Tensor:
    """``[cos(f s), sin(f s)]`` for ``dim // 2`` frequencies geometric in ``[min_freq, max_freq]``.

    Meant for ``s`` of order ``[0, 1]``: the same frequencies as DDPM's embedding of ``1000 s``.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(max_freq), math.log(min_freq), half, device=s.device, dtype=torch.float32))
    args = s.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between; 1x1 skip on width change."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c / heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DigitsUNet(nn.Module):
    """A DDPM-style UNet for (B, 1, 8, 8) inputs: one resolution level per ``channel_mult`` entry
    (8x8, 4x4, ...), ``num_res_blocks`` residual blocks per level going down and one more going up
    (each fed a skip connection), two blocks in the middle, with self-attention between them
    when ``attention_heads > 0``.

    ``forward(x, t)`` embeds ``t * time_scale`` sinusoidally (frequencies 0.1..1000, so the scaled
    time should be of order [0, 1]), passes it through a 2-layer MLP and adds it in every block.
    The output convolution is zero-initialised.
    """

    def __init__(
        self,
        *,
        channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        num_res_blocks: int = 2,
        time_scale: float = 1.0,
        dropout: float = 0.0,
        attention_heads: int = 0,
        in_channels: int = 1,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        mult = [int(m) for m in channel_mult]
        if attention_heads > 0 and (channels * mult[-1]) % attention_heads:
            raise ValueError(f"attention_heads {attention_heads} does not divide the width {channels * mult[-1]}")
        if image_size % 2 ** (len(mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(mult) - 1} for channel_mult {mult}")
        self.config: dict[str, Any] = {
            "channels": int(channels), "channel_mult": mult, "num_res_blocks": int(num_res_blocks),
            "time_scale": float(time_scale), "dropout": float(dropout), "attention_heads": int(attention_heads),
            "in_channels": int(in_channels), "image_size": int(image_size),
        }
        self.time_scale = float(time_scale)
        self.emb_in = int(channels)
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur = [channels], channels
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock(cur, channels * m, emb_dim, dropout))
                cur = channels * m
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        mid_attn = [_Attention(cur, attention_heads)] if attention_heads > 0 else []
        self.mid = nn.ModuleList([_ResBlock(cur, cur, emb_dim, dropout), *mid_attn, _ResBlock(cur, cur, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock(cur + skips.pop(), channels * mult[level], emb_dim, dropout))
                cur = channels * mult[level]
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network output shaped like ``x`` (B, C, H, W) at per-sample times ``t`` (B,)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.time_mlp(sinusoidal_embedding(t * self.time_scale, self.emb_in).to(x.dtype)))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, _ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMDigitsUNet(DigitsUNet):
    """:class:`DigitsUNet` inside the EDM preconditioning (Karras et al. 2022, table 1): the denoiser

        D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),   c_skip = sd^2 / (sigma^2 + sd^2),
        c_out = sigma sd / sqrt(sigma^2 + sd^2),   c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = log(sigma) / 4,

    with ``sd = sigma_data`` (the data's RMS). ``forward(x, sigma)`` returns D, an x0 estimate:
    fewstep's ``prediction="edm"``.
    """

    def __init__(self, *, sigma_data: float = 0.5, **unet: Any) -> None:
        super().__init__(**unet)
        self.sigma_data = float(sigma_data)
        self.config = {**self.config, "sigma_data": self.sigma_data}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        norm = s * s + self.sigma_data**2
        c_skip, c_out, c_in = self.sigma_data**2 / norm, s * self.sigma_data * norm.rsqrt(), norm.rsqrt()
        return c_skip * x + c_out * super().forward(c_in * x, sigma.log() / 4)


class _TimeEmbedding(nn.Module):
    """``t * time_scale`` embedded sinusoidally, then a 2-layer SiLU MLP to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, time_scale: float) -> None:
        super().__init__()
        self.in_dim, self.time_scale = int(in_dim), float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(batch)
        return self.mlp(sinusoidal_embedding(t * self.time_scale, self.in_dim).to(dtype))


class _DiTBlock(nn.Module):
    """Pre-LayerNorm self-attention and MLP, each modulated by the time embedding (adaLN-Zero of
    Peebles & Xie 2023: shift, scale and a zero-initialised gate per branch)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(emb))[:, None, :].chunk(6, dim=-1)
        y = self.norm1(h) * (1 + sc1) + sh1
        q, k, v = self.qkv(y).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        h = h + g1 * self.proj(att)
        return h + g2 * self.mlp(self.norm2(h) * (1 + sc2) + sh2)


class DigitsTransformer(nn.Module):
    """A small DiT (Peebles & Xie 2023) for (B, C, S, S) images: ``patch`` x ``patch`` patches
    embedded linearly with learned positions, ``depth`` adaLN-Zero blocks of width ``width``, a
    modulated LayerNorm and a zero-initialised linear layer back to pixels.
    ``forward(x, t)`` embeds ``t * time_scale`` (scaled time of order [0, 1])."""

    def __init__(self, *, image_size: int = 16, patch: int = 2, width: int = 96, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0, time_scale: float = 1.0, in_channels: int = 1) -> None:
        super().__init__()
        if image_size % patch or width % heads:
            raise ValueError(f"patch {patch} must divide image_size {image_size} and heads {heads} the width {width}")
        self.config: dict[str, Any] = {"image_size": int(image_size), "patch": int(patch), "width": int(width), "depth": int(depth),
                                       "heads": int(heads), "mlp_ratio": float(mlp_ratio), "time_scale": float(time_scale),
                                       "in_channels": int(in_channels)}
        self.patch, self.in_channels, self.side = int(patch), int(in_channels), image_size // patch
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.side * self.side, width))
        self.time = _TimeEmbedding(width, width, time_scale)
        self.blocks = nn.ModuleList([_DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.ada_out = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, patch * patch * in_channels)
        for layer in (self.ada_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network output shaped like ``x`` at per-sample times ``t`` (B,)."""
        b = x.shape[0]
        emb = self.time(t, b, x.dtype)
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.ada_out(F.silu(emb))[:, None, :].chunk(2, dim=-1)
        y = self.out(self.norm_out(h) * (1 + scale) + shift)  # (B, N, p * p * C)
        p, s, c = self.patch, self.side, self.in_channels
        return y.reshape(b, s, s, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, s * p, s * p)


class VectorMLP(nn.Module):
    """A residual MLP for flat vectors (B, dim): ``depth`` blocks of LayerNorm-Linear-SiLU-Linear with
    the time embedding added to each block's hidden layer; the output layer is zero-initialised."""

    def __init__(self, *, dim: int = 64, width: int = 256, depth: int = 3, time_scale: float = 1.0) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"dim": int(dim), "width": int(width), "depth": int(depth), "time_scale": float(time_scale)}
        self.inp = nn.Linear(dim, width)
        self.time = _TimeEmbedding(width, width, time_scale)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        self.fc1 = nn.ModuleList([nn.Linear(width, 2 * width) for _ in range(depth)])
        self.temb = nn.ModuleList([nn.Linear(width, 2 * width) for _ in range(depth)])
        self.fc2 = nn.ModuleList([nn.Linear(2 * width, width) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network output (B, dim) at per-sample times ``t`` (B,)."""
        emb = F.silu(self.time(t, x.shape[0], x.dtype))
        h = self.inp(x)
        for norm, fc1, temb, fc2 in zip(self.norms, self.fc1, self.temb, self.fc2):
            h = h + fc2(F.silu(fc1(norm(h)) + temb(emb)))
        return self.out(self.norm_out(h))


class DigitsClassifier(nn.Module):
    """A CNN for (B, 1, 8, 8) digits: two conv-conv-maxpool stages (8x8 -> 4x4 -> 2x2), a hidden
    linear layer of ``features`` units (the feature space of :meth:`features`) and ``num_classes`` logits.
    """

    def __init__(
        self, *, channels: int = 32, features: int = 128, num_classes: int = 10, dropout: float = 0.2, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "channels": int(channels), "features": int(features), "num_classes": int(num_classes),
            "dropout": float(dropout), "in_channels": int(in_channels),
        }
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * c * 4, features), nn.ReLU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, features): the space for Fréchet distances."""
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) from :meth:`features`."""
        return self.head(self.drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.classify(self.body(x))


NETWORKS: dict[str, type[nn.Module]] = {"DigitsUNet": DigitsUNet, "EDMDigitsUNet": EDMDigitsUNet, "DigitsTransformer": DigitsTransformer,
                                         "VectorMLP": VectorMLP, "DigitsClassifier": DigitsClassifier}


def build(kind: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate the network class named ``kind`` from its ``config`` (only classes in :data:`NETWORKS`)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network class {kind!r}; known: {sorted(NETWORKS)}")
    return NETWORKS[kind](**config)
