"""Encoders and decoders: MLPs for vector states (D,), convolutions for fields (C, H, W).

Encoders map a batch of states to the raw (mean, log-variance) of q(z|x); decoders map
latents to the raw (mean, log-variance) of p(x|z) in the state's shape. Floors and clamps
of the log-variances are applied by the VAE, not here, so every network is interchangeable.
The output layers run in float32 even under bf16 autocast: a decoder mean rounded to bf16
(3 significant digits) would cost nats wherever the learned variance is small.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Float32(nn.Module):
    """Run `layer` in float32 with autocast off (output heads; see the module docstring)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them; the last one (the output head) in float32."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.SiLU()]
    layers.append(Float32(nn.Linear(sizes[-2], sizes[-1])))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, state_shape: tuple[int, ...], latent_dim: int, hidden: int, n_layers: int):
        super().__init__()
        dim = math.prod(state_shape)
        self.net = _mlp([dim] + [hidden] * n_layers + [2 * latent_dim])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    def __init__(self, state_shape: tuple[int, ...], latent_dim: int, hidden: int, n_layers: int):
        super().__init__()
        self.state_shape = tuple(state_shape)
        dim = math.prod(state_shape)
        self.net = _mlp([latent_dim] + [hidden] * n_layers + [2 * dim])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.net(z).chunk(2, dim=1)
        shape = (z.shape[0], *self.state_shape)
        return mean.reshape(shape), logvar.reshape(shape)


def _n_down(size: int, min_size: int) -> int:
    """Stride-2 convs (k=3, p=1: n -> ceil(n/2)) needed to bring `size` to <= min_size."""
    n = 0
    while size > min_size:
        size, n = (size + 1) // 2, n + 1
    return n


def _size_after(size: int, n_down: int) -> int:
    for _ in range(n_down):
        size = (size + 1) // 2
    return size


def _widths(channels: int, n_down: int, max_channels: int) -> list[int]:
    """Channels after each stride-2 conv: doubling from `channels`, capped."""
    return [min(channels * 2**i, max_channels) for i in range(n_down)]


class ConvEncoder(nn.Module):
    """Stride-2 convolutions down to a map of at most `min_size` pixels a side, then a linear head."""

    def __init__(self, state_shape: tuple[int, ...], latent_dim: int, channels: int,
                 min_size: int = 4, max_channels: int = 128):
        super().__init__()
        c, h, w = state_shape
        n_down = max(_n_down(h, min_size), _n_down(w, min_size))
        layers: list[nn.Module] = []
        c_in = c
        for width in _widths(channels, n_down, max_channels):
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.SiLU()]
            c_in = width
        self.features = nn.Sequential(*layers)
        map_numel = c_in * _size_after(h, n_down) * _size_after(w, n_down)
        self.head = Float32(nn.Linear(map_numel, 2 * latent_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.features(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Mirror of `ConvEncoder`: linear to the small map, transposed convs doubling its size, a
    crop to the exact (H, W) (sizes that are not powers of two overshoot by less than 2^n
    pixels), and a 3x3 conv giving the mean and log-variance of every pixel."""

    def __init__(self, state_shape: tuple[int, ...], latent_dim: int, channels: int,
                 min_size: int = 4, max_channels: int = 128):
        super().__init__()
        c, h, w = state_shape
        self.state_shape = (c, h, w)
        n_down = max(_n_down(h, min_size), _n_down(w, min_size))
        widths = _widths(channels, n_down, max_channels)[::-1]  # deepest first
        self.map_shape = (widths[0] if widths else c, _size_after(h, n_down), _size_after(w, n_down))
        self.head = nn.Linear(latent_dim, math.prod(self.map_shape))
        layers: list[nn.Module] = []
        c_in = self.map_shape[0]
        for width in widths[1:] + widths[-1:]:  # back to `channels`, one layer per stride-2 conv
            layers += [nn.ConvTranspose2d(c_in, width, 4, stride=2, padding=1), nn.SiLU()]
            c_in = width
        self.upsample = nn.Sequential(*layers)
        self.out = Float32(nn.Conv2d(c_in, 2 * c, 3, padding=1))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        _, h, w = self.state_shape
        fmap = self.head(z).view(z.shape[0], *self.map_shape)
        mean, logvar = self.out(self.upsample(fmap)[..., :h, :w]).chunk(2, dim=1)
        return mean, logvar


def build_networks(arch: str, state_shape: tuple[int, ...], latent_dim: int, hidden: int,
                   n_layers: int, channels: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for `arch` "mlp" (any state, flattened) or "conv" (C, H, W fields)."""
    if arch == "mlp":
        return (MLPEncoder(state_shape, latent_dim, hidden, n_layers),
                MLPDecoder(state_shape, latent_dim, hidden, n_layers))
    if arch == "conv":
        if len(state_shape) != 3:
            raise ValueError(f"arch 'conv' needs a (C, H, W) field state, got shape {tuple(state_shape)}")
        return (ConvEncoder(state_shape, latent_dim, channels),
                ConvDecoder(state_shape, latent_dim, channels))
    raise ValueError(f"unknown model.arch '{arch}'; known: auto, mlp, conv")
