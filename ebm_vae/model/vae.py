"""The VAE LightningModule: a density model of one capsule's z-scored states.

Self-describing: the constructor takes plain containers only (state info, capsule config,
a little about the statistics), so the checkpoint's hyper-parameters load with torch's
`weights_only=True`; the normalisation (and, for fields, the principal basis) are buffers
and travel in the state dict. Everything downstream (export, `EnergyModel`) needs only the
checkpoint.

Units: batches arrive in physical units; the model's `transform` (`ebm_vae.model.transforms`)
maps them to normalised coordinates u and the exact terms log_det, so that
log p(x) = bound(u) + log_det(x). For z-scoring, u = (x - mean) / std and
log_det = -sum(log std) = -log_jacobian. Logged losses are in normalised units (the constant
log_jacobian left out); `val/iwae_phys` and every energy are in physical units.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ebm_vae.config import to_container
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.model.bounds import ElboTerms, elbo_terms, iwae_bound, soft_floor_logvar
from ebm_vae.model.networks import build_networks
from ebm_vae.model.transforms import build_transform

INPUT_CLIP = 1e3  # z-units; only the encoder's input is clipped (any q gives a valid bound)
Q_LOGVAR_RANGE = (-20.0, 10.0)  # encoder log-variance clamp: exp() stays finite
ROW_BUDGET = 1 << 24  # floats per decoder call when evaluating bounds (memory, not accuracy)
SLICE_LIMIT = 4.0  # the logged energy slice spans mean +/- 4 std along each axis


class VAE(L.LightningModule):
    """Gaussian VAE with a learned per-component decoder variance and a N(0, I) prior.

    Args:
        state: `StateInfo.to_dict()` of the capsule's state.
        capsule: the capsule config as a plain dict.
        stats_meta: a small summary of the statistics (count, created, files) for provenance.
        arch: "mlp", "conv", or "auto" (conv where the model coordinates are an image, mlp for
            vectors, including the principal coefficients of a field).
        latent_dim: None = auto (min(dim, 16) of the model coordinates; 16 for images).
        hidden, n_layers: MLP width and depth (mlp encoder/decoder).
        channels: first conv width (doubling per stride-2 level, capped at 128).
        val_k: importance samples of the validation bound `val/iwae`.
        kl_warmup_steps: a training aid only: the KL term of the *training loss* is scaled by
            min(1, step / kl_warmup_steps); the logged validation bounds stay exact.
        min_logvar, max_logvar: soft floor / hard cap of the decoder log-variance (z-units).
    """

    def __init__(self, state: dict[str, Any], capsule: dict[str, Any] | None = None,
                 stats_meta: dict[str, Any] | None = None, arch: str = "auto",
                 latent_dim: int | None = None, hidden: int = 128, n_layers: int = 2,
                 channels: int = 16, lr: float = 1e-3, weight_decay: float = 0.0,
                 val_k: int = 64, kl_warmup_steps: int = 0,
                 min_logvar: float = math.log(1e-4), max_logvar: float = 10.0):
        super().__init__()
        # Plain containers in the hyper-parameters, whatever the caller passed (weights_only).
        state = to_container(state)
        capsule, stats_meta = to_container(capsule or {}), to_container(stats_meta or {})
        info = StateInfo.from_dict(state)
        # fields: the statistics' rank of the principal coefficients the core models (train.py)
        transform = build_transform(info, capsule, field_rank=stats_meta.get("field_rank"))
        model_shape = transform.out_shape
        if arch == "auto":  # conv for images (C, H, W), an MLP for vectors (principal coefficients)
            arch = "conv" if len(model_shape) == 3 else "mlp"
        if latent_dim is None:
            latent_dim = 16 if len(model_shape) == 3 else min(math.prod(model_shape), 16)
        self.save_hyperparameters()
        self.state_info = info
        self.transform = transform
        self.encoder, self.decoder = build_networks(arch, self.transform.out_shape, latent_dim, hidden,
                                                    n_layers, channels)
        # The crawl's statistics of the data (grids, default map limits, provenance); the
        # transform keeps what the density itself needs.
        self.register_buffer("norm_mean", torch.zeros(info.dim))
        self.register_buffer("norm_std", torch.ones(info.dim))
        self.register_buffer("pca_components", torch.zeros(0, info.dim))  # (k, D), physical units
        self.register_buffer("pca_std", torch.zeros(0))  # (k,), physical units
        self.best_val_iwae = math.inf
        self._recon_examples: Tensor | None = None

    # -- normalisation ------------------------------------------------------------------

    def set_normalization(self, stats: Any) -> VAE:
        """Adopt a `Stats`: the transform's normalisation, the data's mean/std and principal basis."""
        dim = self.state_info.dim
        mean = torch.as_tensor(np.asarray(stats.mean, dtype=np.float32)).reshape(dim)
        std = torch.as_tensor(np.asarray(stats.std, dtype=np.float32)).reshape(dim)
        self.norm_mean = mean.to(self.norm_mean.device)
        self.norm_std = std.to(self.norm_std.device)
        self.transform.set_statistics(stats)
        pca = getattr(stats, "pca", None)
        if pca:
            components = np.asarray(pca["components"], dtype=np.float32).reshape(-1, dim)
            self.pca_components = torch.as_tensor(components, device=self.norm_mean.device)
            self.pca_std = torch.as_tensor(np.asarray(pca["std"], dtype=np.float32).reshape(-1),
                                           device=self.norm_mean.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The principal basis has as many rows as the statistics kept; adopt the stored shape.
        for name in ("pca_components", "pca_std"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def log_jacobian(self) -> float:
        """The transform's log-volume (sum(log std) for z-scoring): normalised -> physical units."""
        return self.transform.log_scale

    def transformed(self, x_phys: Tensor) -> tuple[Tensor, Tensor]:
        """(u, log_det) of physical states, flat (N, D) or shaped (N, *state.shape)."""
        x = torch.as_tensor(x_phys, dtype=torch.float32, device=self.norm_mean.device)
        return self.transform(x.reshape(x.shape[0], -1))

    # -- the model ----------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x.clamp(-INPUT_CLIP, INPUT_CLIP))
        return mu.float(), logvar.float().clamp(*Q_LOGVAR_RANGE)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw_logvar = self.decoder(z)
        return mean.float(), soft_floor_logvar(raw_logvar, self.hparams.min_logvar, self.hparams.max_logvar)

    def elbo_terms(self, x: Tensor, generator: torch.Generator | None = None) -> ElboTerms:
        return elbo_terms(x, self.encode(x), self.decode, generator)

    @property
    def _max_rows(self) -> int:
        """Decoder rows per call when evaluating bounds, sized to the state and the widths."""
        per_row = 8 * self.state_info.dim + self.hparams.hidden * self.hparams.n_layers
        return max(1, ROW_BUDGET // per_row)

    @torch.no_grad()
    def log_prob(self, x_phys: Tensor, k: int = 1, generator: torch.Generator | None = None,
                 return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Lower bound on log p(x) in nats for physical states (N, D) or (N, *state.shape) -> (N,)
        float64, for the density in physical units (every exact term of the transform included).

        `return_stderr`: also the Monte Carlo standard error of the bound (see `iwae_bound`)."""
        u, log_det = self.transformed(x_phys)
        bound = self.log_prob_bound(u, k, generator, return_stderr)
        if return_stderr:
            return bound[0].double() + log_det, bound[1].double()
        return bound.double() + log_det

    @torch.no_grad()
    def log_prob_bound(self, x: Tensor, k: int = 1, generator: torch.Generator | None = None,
                       return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Lower bound on log p(u) in nats for model coordinates u (N, *transform.out_shape) -> (N,).

        k = 1: the ELBO (one draw, exact KL); k > 1: the importance-weighted bound with k
        draws, evaluated in chunks. Reproducible given `generator` (on x's device).
        Evaluation only (no gradients). `return_stderr`: also its standard error (nan at k = 1).
        """
        x = x.to(self.norm_mean.device, torch.float32)
        rows = self._max_rows
        bounds, errors = [], []
        for chunk in x.split(max(1, rows // k)):
            if k == 1:
                bounds.append(self.elbo_terms(chunk, generator).elbo)
                errors.append(torch.full_like(bounds[-1], math.nan))
            else:
                out = iwae_bound(chunk, self.encode(chunk), self.decode, k, generator, rows, return_stderr=True)
                bounds.append(out[0])
                errors.append(out[1])
        bound = torch.cat(bounds) if bounds else x.new_zeros(0)
        if return_stderr:
            return bound, torch.cat(errors) if errors else x.new_zeros(0)
        return bound

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n states drawn from the model's density, (n, D) float32 in physical units."""
        device = self.norm_mean.device
        z = torch.randn((n, self.hparams.latent_dim), generator=generator, device=device)
        mean, logvar = self.decode(z)
        u = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=device)
        return self.transform.inverse(u, generator)

    # -- training -----------------------------------------------------------------------

    @staticmethod
    def _states(batch: Any) -> Tensor:
        """The stream yields tensors; (x,) tuples from a TensorDataset work too."""
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def kl_weight(self) -> float:
        warmup = self.hparams.kl_warmup_steps
        return 1.0 if warmup <= 0 else min(1.0, (self.global_step + 1) / warmup)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, exact = self._normalised(self._states(batch))
        terms = self.elbo_terms(x)
        beta = self.kl_weight()
        loss = -(terms.recon - beta * terms.kl + exact).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        if beta < 1.0:
            self.log("train/kl_weight", beta, batch_size=x.shape[0])
        return loss

    def _normalised(self, x_phys: Tensor) -> tuple[Tensor, Tensor]:
        """(u, exact terms in normalised units): log_det + log_jacobian (0 for z-scoring)."""
        u, log_det = self.transform(x_phys.reshape(x_phys.shape[0], -1).float())
        return u, (log_det + self.log_jacobian).float()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, exact = self._normalised(self._states(batch))
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        encoded = self.encode(x)
        terms = elbo_terms(x, encoded, self.decode, generator)
        iwae = iwae_bound(x, encoded, self.decode, self.hparams.val_k, generator, self._max_rows)
        n = x.shape[0]
        metrics = {
            "val/elbo": -(terms.elbo + exact).mean(),
            "val/recon": -terms.recon.mean(),
            "val/kl": terms.kl.mean(),
            "val/iwae": -(iwae + exact).mean(),
            "val/iwae_phys": -(iwae + exact).mean() + self.log_jacobian,
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=n,
                      prog_bar=False)
        if batch_idx == 0:
            self._recon_examples = self._states(batch)[:4].detach()  # physical units

    def on_validation_end(self) -> None:
        """After the epoch's metrics are reduced: the hp metric (best val/iwae) and images."""
        if self.trainer.sanity_checking:
            return
        current = self.trainer.callback_metrics.get("val/iwae")
        if current is not None and math.isfinite(float(current)):
            self.best_val_iwae = min(self.best_val_iwae, float(current))
        if not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if math.isfinite(self.best_val_iwae):
                logger.log_metrics({"hp_metric": self.best_val_iwae}, step=self.global_step)
            writer = getattr(logger, "experiment", None)
            if hasattr(writer, "add_image"):
                self._log_images(writer)

    def on_fit_start(self) -> None:
        """TensorBoard's hparams table: a flat summary, with the best val/iwae as its metric."""
        if not self.trainer.is_global_zero:
            return
        h = self.hparams
        summary = {
            "capsule": h.capsule.get("name", ""), "state_shape": "x".join(map(str, self.state_info.shape)),
            "arch": h.arch, "latent_dim": h.latent_dim, "hidden": h.hidden, "n_layers": h.n_layers,
            "channels": h.channels, "lr": h.lr, "weight_decay": h.weight_decay, "val_k": h.val_k,
            "kl_warmup_steps": h.kl_warmup_steps, "min_logvar": h.min_logvar,
            "train_samples": h.stats_meta.get("count", 0),
        }
        for logger in self.loggers:
            logger.log_hyperparams(summary, {"hp_metric": self.best_val_iwae})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_iwae"] = self.best_val_iwae

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_val_iwae = float(checkpoint.get("best_val_iwae", math.inf))

    # -- TensorBoard images -------------------------------------------------------------

    def slice_plane(self) -> Tensor | None:
        """Two directions (2, D) in physical units spanning the logged energy slice, one std each.

        Fields with a principal basis: pc1, pc2 (the export's default axes); otherwise the
        first two state components. None for one-component states.
        """
        dim = self.state_info.dim
        if self.pca_components.shape[0] >= 2:
            return self.pca_std[:2, None] * self.pca_components[:2]
        if dim < 2:
            return None
        return torch.eye(2, dim, device=self.norm_std.device) * self.norm_std

    @torch.no_grad()
    def _log_images(self, writer: Any) -> None:
        plane = self.slice_plane()
        if plane is not None:
            resolution = 32 if self.state_info.kind == "field" else 64
            ticks = torch.linspace(-SLICE_LIMIT, SLICE_LIMIT, resolution, device=plane.device)
            a, b = torch.meshgrid(ticks, ticks, indexing="ij")
            points = self.norm_mean + a.reshape(-1, 1) * plane[0] + b.reshape(-1, 1) * plane[1]
            # k = 8 smooths the cheap vector slices; a field slice decodes 1024 full maps per draw
            k = 1 if self.state_info.kind == "field" else 8
            energy = -self.log_prob(points, k=k, generator=torch.Generator(device=plane.device).manual_seed(0))
            image = energy.view(resolution, resolution).T.flip(0)  # rows: second axis, upwards
            writer.add_image("val/energy_slice", _colorize(image), self.global_step, dataformats="HWC")
        if self.state_info.kind == "field" and self._recon_examples is not None:
            x = self._recon_examples.float().reshape(len(self._recon_examples), -1)
            u, _ = self.transform(x)
            recon = self.transform.inverse(self.decode(self.encode(u)[0])[0], draw=False)
            x, recon = (((v - self.norm_mean) / self.norm_std).view(-1, *self.state_info.shape)
                        for v in (x, recon))
            # each row: the sample's channels, then their reconstructions; z-units -3..3 to grey
            rows = [torch.cat([*xi, *ri], dim=-1) for xi, ri in zip(x, recon, strict=True)]
            grid = ((torch.cat(rows, dim=-2) + 3.0) / 6.0).clamp(0, 1)
            writer.add_image("val/reconstructions", grid.unsqueeze(0).cpu(), self.global_step,
                             dataformats="CHW")


def _colorize(values: Tensor) -> np.ndarray:
    """(H, W) energies -> (H, W, 3) viridis image from the minimum to the 90th percentile.

    A fixed span in nats would not do: over the same +/- 4 std, a 2-D state's energy varies
    by tens of nats and a 64 x 64 field's by thousands.
    """
    from matplotlib import colormaps

    v = values.double().cpu().numpy()
    finite = np.isfinite(v)
    lo, hi = (v[finite].min(), np.quantile(v[finite], 0.9)) if finite.any() else (0.0, 1.0)
    scaled = np.clip(np.where(finite, (v - lo) / max(hi - lo, 1e-6), 1.0), 0.0, 1.0)
    return colormaps["viridis"](scaled)[..., :3].astype(np.float32)
