"""Encoders and decoders of an ensemble of M VAEs: MLPs for vector cores, convolutions for fields.

An ensemble is a batch dimension: every network holds M independently initialised members
and runs them together, so that M members cost little more than one where the layers are
small (the MLP path multiplies (M, rows, in) by (M, in, out) weights in one call). Shapes:

- encoder: u (N, *core_shape) -> (mu, logvar), each (M, N, L) (every member sees the same u);
- decoder: z (M, R, L) -> (mean, logvar), each (M, R, D) with D = prod(core_shape), flat.

Floors and clamps of the log-variances are applied by `ebm_vae.model.ensemble`, not here, so
every network is interchangeable. The output layers run in float32 even under bf16 autocast:
a decoder mean rounded to bf16 (3 significant digits) would cost nats wherever the learned
variance is small.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

RESIDUAL_INIT_LOGVAR = -4.0  # initial log-variance of residual q(z|u) and p(u|z): sigma ~0.14 model units


class Float32(nn.Module):
    """Run `layer` in float32 with autocast off (output heads; see the module docstring)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


class EnsembleLinear(nn.Module):
    """M independent linear layers applied at once: (M, R, n_in) -> (M, R, n_out).

    Initialised as `nn.Linear` is, per member. `mask` (n_out, n_in), optional, zeroes
    connections (autoregressive conditioners of the flow prior).
    """

    def __init__(self, members: int, n_in: int, n_out: int, mask: Tensor | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(max(n_in, 1))
        self.weight = nn.Parameter(torch.empty(members, n_out, n_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, n_out).uniform_(-bound, bound))
        self.register_buffer("mask", None if mask is None else mask.float())

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight if self.mask is None else self.weight * self.mask
        return torch.baddbmm(self.bias.unsqueeze(1).to(x.dtype), x, weight.transpose(1, 2).to(x.dtype))


def ensemble_mlp(members: int, sizes: list[int], masks: list[Tensor] | None = None) -> nn.Sequential:
    """EnsembleLinear layers with SiLU between them; the last one (the output head) in float32."""
    masks = masks or [None] * (len(sizes) - 1)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layer = EnsembleLinear(members, n_in, n_out, masks[i])
        layers += [Float32(layer)] if i == len(sizes) - 2 else [layer, nn.SiLU()]
    return nn.Sequential(*layers)


def _residual_head(net: nn.Sequential, dim: int) -> None:
    """Output head of a residual net: zero offset, log-variance RESIDUAL_INIT_LOGVAR, so that an
    untrained member starts as the identity map with a narrow Gaussian around it."""
    head = net[-1].layer
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[:, dim:] = RESIDUAL_INIT_LOGVAR


class MLPEncoder(nn.Module):
    """MLP to the (mean, log-variance) of q(z|u). `residual` (latent size = core size): the mean
    is u + MLP(u)."""

    def __init__(self, members: int, core_shape: tuple[int, ...], latent_dim: int, hidden: int,
                 n_layers: int, residual: bool = False):
        super().__init__()
        self.members = members
        dim = math.prod(core_shape)
        if residual and dim != latent_dim:
            raise ValueError(f"a residual encoder needs latent_dim == core size {dim}, got {latent_dim}")
        self.residual = residual
        self.net = ensemble_mlp(members, [dim] + [hidden] * n_layers + [2 * latent_dim])
        if residual:
            _residual_head(self.net, latent_dim)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        flat = u.flatten(1).unsqueeze(0).expand(self.members, -1, -1)
        mu, logvar = self.net(flat).chunk(2, dim=-1)
        return (flat.float() + mu if self.residual else mu), logvar


class MLPDecoder(nn.Module):
    """MLP to the (mean, log-variance) of p(u|z); `residual`: the mean is z + MLP(z), so that the
    decoder can stay close to the identity and leave the shape of the density to the flow
    prior, while bending where sharp curved valleys need it."""

    def __init__(self, members: int, core_shape: tuple[int, ...], latent_dim: int, hidden: int,
                 n_layers: int, residual: bool = False):
        super().__init__()
        dim = math.prod(core_shape)
        if residual and dim != latent_dim:
            raise ValueError(f"a residual decoder needs latent_dim == core size {dim}, got {latent_dim}")
        self.residual = residual
        self.net = ensemble_mlp(members, [latent_dim] + [hidden] * n_layers + [2 * dim])
        if residual:
            _residual_head(self.net, dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.net(z).chunk(2, dim=-1)
        return (z.float() + mean if self.residual else mean), logvar


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
    """One member: stride-2 convolutions down to a map of at most `min_size` pixels a side, then
    a linear head; (N, C, H, W) -> (mu, logvar), each (N, L)."""

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
    """One member, the mirror of `ConvEncoder`: linear to the small map, transposed convs doubling
    its size, a crop to the exact (H, W) (sizes that are not powers of two overshoot by less
    than 2^n pixels), and a 3x3 conv giving the mean and log-variance of every pixel;
    z (R, L) -> (mean, logvar), each (R, C, H, W)."""

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


class StackedEncoder(nn.Module):
    """M conv encoders run one after the other (convolutions are large enough to gain nothing
    from batching members): u (N, C, H, W) -> (M, N, L) pairs."""

    def __init__(self, encoders: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(encoders)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        pairs = [encoder(u) for encoder in self.members]
        return torch.stack([mu for mu, _ in pairs]), torch.stack([lv for _, lv in pairs])


class StackedDecoder(nn.Module):
    """M conv decoders: z (M, R, L) -> (M, R, D) pairs, flat."""

    def __init__(self, decoders: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(decoders)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        pairs = [decoder(zm) for decoder, zm in zip(self.members, z, strict=True)]
        return (torch.stack([mean.flatten(1) for mean, _ in pairs]),
                torch.stack([lv.flatten(1) for _, lv in pairs]))


def build_networks(arch: str, members: int, core_shape: tuple[int, ...], latent_dim: int, hidden: int,
                   n_layers: int, channels: int, residual: bool = False) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of M members for `arch` "mlp" (any core, flattened; `residual` where
    the latent has the core's size) or "conv" ((C, H, W) cores)."""
    if arch == "mlp":
        return (MLPEncoder(members, core_shape, latent_dim, hidden, n_layers, residual),
                MLPDecoder(members, core_shape, latent_dim, hidden, n_layers, residual))
    if arch == "conv":
        if len(core_shape) != 3:
            raise ValueError(f"arch 'conv' needs a (C, H, W) field state, got shape {tuple(core_shape)}")
        return (StackedEncoder([ConvEncoder(core_shape, latent_dim, channels) for _ in range(members)]),
                StackedDecoder([ConvDecoder(core_shape, latent_dim, channels) for _ in range(members)]))
    raise ValueError(f"unknown model.arch '{arch}'; known: auto, mlp, conv")
