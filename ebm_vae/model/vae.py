"""The VAE LightningModule: a density model of one capsule's states, in physical units.

Self-describing: the constructor takes plain containers only (state info, capsule config,
a little about the statistics), so the checkpoint's hyper-parameters load with torch's
`weights_only=True`; the normalisation (and, for fields, the principal basis) are buffers
and travel in the state dict. Everything downstream (export, `EnergyModel`) needs only the
checkpoint.

Units: batches arrive in physical units; the model's `transform` (`ebm_vae.model.transforms`)
maps them to model coordinates u and the exact terms log_det, so that
log p(x) = log p_core(u) + log_det(x). Logged losses are in normalised units (the constant
`log_jacobian` left out); `val/iwae_phys` and every energy are in physical units.

The core density is an ensemble of `members` VAEs (`ebm_vae.model.ensemble.Ensemble`: encoders,
decoders, priors, run as one batched computation), each trained on its own Poisson(1)
bootstrap weighting of every batch.
The density is their mixture, so the energy stays a bound (ELBO at k = 1, importance-weighted
bound at k > 1, see `ebm_vae.model.elbo.mixture_bound`), and the members' spread is an
epistemic uncertainty that shrinks as the data grows. Evaluation, validation and checkpoints
use an exponential moving average of the weights (`ema`); the optimiser updates `members`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from ebm_vae.config import to_container
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.model.elbo import mixture_bound
from ebm_vae.model.ensemble import Ensemble
from ebm_vae.model.support import reservoir_update
from ebm_vae.model.transforms import build_transform

ROW_BUDGET = 1 << 24  # floats per decoder call when evaluating bounds (memory, not accuracy)
MAX_RESIDUAL_LATENT = 64  # MLP cores up to this size get a latent of their own size (residual nets)


def auto_width(n_samples: int, dim: int) -> int:
    """Hidden width of the MLPs and flow conditioners from the data: ~N^(1/4), 32 to 256.

    A fixed width overfits ten thousand samples and underfits a million; the capacity a
    density estimate can use grows slowly with N (measured on the study's densities).
    """
    n = max(int(n_samples or 0), 1)
    width = 8.0 * n ** 0.25 * max(1.0, dim / 8.0) ** 0.5
    return int(min(256, max(32, 2 ** round(math.log2(width)))))


class VAE(L.LightningModule):
    """An ensemble of Gaussian VAEs with learned priors; see the module docstring.

    Args:
        state: `StateInfo.to_dict()` of the capsule's state.
        capsule: the capsule config as a plain dict.
        stats_meta: a small summary of the statistics (count, created, files) for provenance;
            `count` sizes the networks when `hidden` is None; `field_rank` (fields) is the
            number of principal coefficients the core models (`PrincipalField`).
        arch: "mlp", "conv", or "auto" (the MLP for 1-D model coordinates, conv for fields).
        latent_dim: None = auto: the core's size for MLP cores up to MAX_RESIDUAL_LATENT
            (residual encoder and decoder, so the prior carries the density's shape), else 16.
        hidden: MLP and flow-conditioner width; None = `auto_width(count, core size)`.
        n_layers: MLP depth (encoder and decoder each).
        channels: first conv width (doubling per stride-2 level, capped at 128).
        prior: "flow" (a neural spline flow over z) or "standard" (N(0, I)).
        prior_transforms, prior_bins: the flow's spline layers and bins per spline.
        members: ensemble size (1 = a single VAE; its energies then carry only the Monte
            Carlo standard error).
        bootstrap: weight each member's samples by Poisson(1) counts (the members' spread then
            estimates the sampling uncertainty of the fit).
        train_k: importance samples of the training bound (1 = ELBO, > 1 = IWAE).
        lr, weight_decay: AdamW; the rate warms up linearly over `warmup_steps`, then follows
            a cosine to zero at the trainer's max_steps (`lr_schedule="constant"`: no decay).
        ema_decay: exponential moving average of the weights used for evaluation (0 = off).
        val_k: importance samples of the validation bound `val/iwae`.
        kl_warmup_steps: a training aid only: the KL term of the *training loss* is scaled by
            min(1, step / kl_warmup_steps); the logged validation bounds stay exact.
        min_logvar, max_logvar: soft floor / hard cap of the decoder log-variance (model units).
        support_size: training states kept in the `support_states` reservoir (0 = none).
        seed: the reservoir's random stream (its content is reproducible for a seed).
    """

    def __init__(self, state: dict[str, Any], capsule: dict[str, Any] | None = None,
                 stats_meta: dict[str, Any] | None = None, arch: str = "auto",
                 latent_dim: int | None = None, hidden: int | None = None, n_layers: int = 2,
                 channels: int = 16, prior: str = "flow", prior_transforms: int = 4, prior_bins: int = 12,
                 members: int = 4, bootstrap: bool = True, train_k: int = 1, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 100, lr_schedule: str = "cosine",
                 ema_decay: float = 0.999, val_k: int = 64, kl_warmup_steps: int = 0,
                 min_logvar: float = math.log(1e-4), max_logvar: float = 10.0,
                 support_size: int = 8192, seed: int = 0):
        super().__init__()
        # Plain containers in the hyper-parameters, whatever the caller passed (weights_only).
        state = to_container(state)
        capsule, stats_meta = to_container(capsule or {}), to_container(stats_meta or {})
        info = StateInfo.from_dict(state)
        # fields: the statistics' rank of the principal coefficients the core models (train.py)
        transform = build_transform(info, capsule, field_rank=stats_meta.get("field_rank"))
        core_shape = tuple(transform.out_shape)
        core_dim = math.prod(core_shape)
        if arch == "auto":
            arch = "mlp" if len(core_shape) == 1 else "conv"
        residual = arch == "mlp" and core_dim <= MAX_RESIDUAL_LATENT
        if latent_dim is None:
            latent_dim = core_dim if residual else 16
        residual = residual and latent_dim == core_dim
        if hidden is None:
            hidden = auto_width(stats_meta.get("count", 0), core_dim)
        if members < 1 or train_k < 1 or val_k < 1:
            raise ValueError(f"model.members, model.train_k and model.val_k must be >= 1, "
                             f"got {members}, {train_k}, {val_k}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"model.lr_schedule must be 'cosine' or 'constant', got '{lr_schedule}'")
        self.save_hyperparameters()  # the resolved arch, latent_dim and hidden
        self.state_info = info
        self.transform = transform
        self.members = Ensemble(members, arch, core_shape, latent_dim, hidden, n_layers, channels, residual,
                                prior, prior_transforms, prior_bins, min_logvar, max_logvar)
        self.ema = copy.deepcopy(self.members).requires_grad_(False) if ema_decay > 0 else None
        # The crawl's statistics of the data (grids, default map limits, provenance); the
        # transform keeps what the density itself needs.
        self.register_buffer("norm_mean", torch.zeros(info.dim))
        self.register_buffer("norm_std", torch.ones(info.dim))
        self.register_buffer("pca_components", torch.zeros(0, info.dim))  # (k, D), physical units
        self.register_buffer("pca_std", torch.zeros(0))  # (k,), physical units
        # The support reservoir (`ebm_vae.model.support`): training states, and the draws behind them.
        self.register_buffer("support_states", torch.zeros(0, info.dim))
        self.register_buffer("support_seen", torch.zeros((), dtype=torch.int64))
        self._support_generator: torch.Generator | None = None
        self.best_val_iwae = math.inf
        self._hparams_logged = False
        self.val_examples: Tensor | None = None  # a few validation states (physical) for figures

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
        if self.state_info.kind == "field" and len(self.pca_components):
            self.support_states = self.support_states.new_zeros(0, len(self.pca_components))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The principal basis and the reservoir have as many rows as were kept; adopt the stored shape.
        for name in ("pca_components", "pca_std", "support_states"):
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

    # -- the density --------------------------------------------------------------------

    @property
    def evaluated(self) -> Ensemble:
        """The members that answer queries: the moving average of the weights, when kept."""
        return self.ema if self.ema is not None else self.members

    @property
    def encoder(self) -> nn.Module:
        """The evaluated members' encoder (benchmarks hook into it)."""
        return self.evaluated.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.evaluated.decoder

    def encode(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """q_m(z|u) of the evaluated members: (mean, log-variance), each (M, N, L)."""
        return self.evaluated.encode(u)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """p_m(u|z) of the evaluated members for z (M, R, L): (mean, log-variance), (M, R, D)."""
        return self.evaluated.decode(z)

    @property
    def _max_rows(self) -> int:
        """Decoder rows per call (over all members) when evaluating bounds, sized to the core
        and the widths."""
        h = self.hparams
        per_row = (8 * math.prod(self.transform.out_shape) + h.hidden * h.n_layers
                   + (h.prior_transforms * (2 * h.hidden + 12 * h.prior_bins * h.latent_dim)
                      if h.prior == "flow" else 0))
        return max(1, ROW_BUDGET // per_row)

    @torch.no_grad()
    def member_log_prob(self, x_phys: Tensor, k: int = 1,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Each evaluated member's bound on log p_m(x) for physical states: (M, N) float64 nats
        (transform terms included), and its standard error (M, N) (nan at k = 1)."""
        u, log_det = self.transformed(x_phys)
        bounds, errors = self.member_bounds(u, k, generator)
        return bounds.double() + log_det, errors.double()

    @torch.no_grad()
    def member_bounds(self, u: Tensor, k: int = 1,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Each evaluated member's bound on log p_m(u) in model coordinates, (M, N) float32, and
        its standard error (M, N); in chunks of rows that fit ROW_BUDGET."""
        u = u.to(self.norm_mean.device, torch.float32)
        members = self.evaluated
        bounds, errors = [], []
        for chunk in u.split(max(1, self._max_rows // (k * members.size))):
            bound, error = members.bound(chunk, k, generator, self._max_rows, return_stderr=True)
            bounds.append(bound)
            errors.append(error)
        if not bounds:
            empty = u.new_zeros(members.size, 0)
            return empty, empty
        return torch.cat(bounds, dim=1), torch.cat(errors, dim=1)

    @torch.no_grad()
    def log_prob(self, x_phys: Tensor, k: int = 1, generator: torch.Generator | None = None,
                 return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Lower bound on log p(x) in nats for physical states (N, D) or (N, *state.shape) -> (N,)
        float64, for the density in physical units (every exact term of the transform included):
        the ensemble's mixture of ELBOs (k = 1) or importance-weighted bounds (k > 1).

        `return_stderr`: also its Monte Carlo standard error (nan at k = 1)."""
        bounds, errors = self.member_log_prob(x_phys, k, generator)
        bound, stderr = mixture_bound(bounds, errors)
        return (bound, stderr) if return_stderr else bound

    @torch.no_grad()
    def log_prob_bound(self, u: Tensor, k: int = 1, generator: torch.Generator | None = None,
                       return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Lower bound on log p(u) in nats for model coordinates u (N, *transform.out_shape) -> (N,)
        float32: the ensemble's mixture bound (ELBO for k = 1, importance-weighted for k > 1).
        Reproducible given `generator` (on u's device). `return_stderr`: also its standard error."""
        bound, stderr = mixture_bound(*self.member_bounds(u, k, generator))
        return (bound, stderr) if return_stderr else bound

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *, physical: bool = True) -> Tensor:
        """n states drawn from the model's density (the members' mixture), (n, D) float32 in
        physical units; with `physical=False` the model coordinates u (n, *transform.out_shape)
        the core drew (what a marginal map integrates over, without building field states)."""
        members = self.evaluated
        device = self.norm_mean.device
        choice = torch.randint(members.size, (n,), generator=generator, device=device)
        counts = torch.bincount(choice, minlength=members.size)
        draws = members.sample(int(counts.max()) if n else 0, generator)  # (M, max count, D)
        # draw i of the mixture is the next unused draw of its member
        rank = torch.zeros_like(choice)
        for index in range(members.size):
            rows = choice == index
            rank[rows] = torch.arange(int(rows.sum()), device=device)
        u = draws[choice, rank].reshape(n, *self.transform.out_shape)
        return self.transform.inverse(u, generator) if physical else u

    # -- the support reservoir ----------------------------------------------------------

    def support_coordinates(self, x_phys: Tensor) -> Tensor:
        """What the reservoir keeps of physical states: the flat state, or for field states with
        a principal basis the coefficients (x - mean) @ pca_components.T."""
        flat = x_phys.reshape(x_phys.shape[0], -1).float()
        if self.support_states.shape[1] != self.state_info.dim:
            return (flat - self.norm_mean) @ self.pca_components.T
        return flat

    @torch.no_grad()
    def record_support(self, x_phys: Tensor) -> None:
        """Add a training batch (physical units) to the `support_states` reservoir."""
        capacity = self.hparams.support_size
        if capacity <= 0:
            return
        if self._support_generator is None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._support_generator = torch.Generator().manual_seed(
                self.hparams.seed * 1_000_003 + 7919 * rank + int(self.support_seen))
        seen = int(self.support_seen) // self._world_size
        self.support_states = reservoir_update(self.support_states, seen, self.support_coordinates(x_phys),
                                               capacity, self._support_generator)
        # draws behind the reservoir, over every rank (each rank keeps a sample of its share)
        self.support_seen += len(x_phys) * self._world_size

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def support_samples(self) -> int:
        """Training samples the reservoir stands for: the draws behind it, at most the data's
        sample count (epochs repeat states)."""
        count = self.hparams.stats_meta.get("count") or 0
        seen = int(self.support_seen)
        return min(seen, count) if count else seen

    # -- training -----------------------------------------------------------------------

    @staticmethod
    def _states(batch: Any) -> Tensor:
        """The stream yields tensors; (x,) tuples from a TensorDataset work too."""
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def kl_weight(self) -> float:
        warmup = self.hparams.kl_warmup_steps
        return 1.0 if warmup <= 0 else min(1.0, (self.global_step + 1) / warmup)

    def training_loss(self, x_phys: Tensor) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """(objective, -bound) of a batch of physical states: the objective sums the members'
        bootstrap-weighted negative bounds (ELBO, KL warm-up applied, or IWAE with `train_k`);
        the second is the plain mean negative bound per member (what `train/loss` logs)."""
        u, exact = self._normalised(x_phys)
        if u.shape[0] == 0:  # every state at or beyond a physical bound: nothing to learn from
            return None, None
        beta, k = self.kl_weight(), self.hparams.train_k
        if k == 1:
            terms = self.members.elbo_terms(u)
            per_sample = terms.recon - beta * terms.kl + exact  # (M, N)
        else:
            per_sample = self.members.bound(u, k, max_rows=self._max_rows) + exact
        weights = (torch.poisson(torch.ones_like(per_sample))
                   if self.hparams.bootstrap and self.members.size > 1 else 1.0)
        objective = -(weights * per_sample).mean(dim=1).sum()
        return objective, -per_sample.detach().mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x_phys = self._states(batch)
        self.record_support(x_phys)
        objective, loss = self.training_loss(x_phys)
        if objective is None:  # Lightning skips the step
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=x_phys.shape[0])
        if self.hparams.kl_warmup_steps > 0 and self.kl_weight() < 1.0:
            self.log("train/kl_weight", self.kl_weight(), batch_size=x_phys.shape[0])
        return objective

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the averaged weights towards the current ones; the decay ramps up as
        (1 + t) / (10 + t) so that short runs are not dominated by their initial weights."""
        if self.ema is None:
            return
        step = self.global_step if self._trainer is not None else 0
        decay = min(self.hparams.ema_decay, (1.0 + step) / (10.0 + step))
        averaged = list(self.ema.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in self.members.parameters()], 1.0 - decay)

    def _normalised(self, x_phys: Tensor) -> tuple[Tensor, Tensor]:
        """(u, exact terms in normalised units): log_det + log_jacobian (0 for z-scoring), of the
        states inside the transform's support (bounded states at or beyond a bound have
        log_det = -inf: a point mass or impossible values, left out of the density's fit)."""
        u, log_det = self.transform(x_phys.reshape(x_phys.shape[0], -1).float())
        inside = torch.isfinite(log_det)
        if not inside.all():
            u, log_det = u[inside], log_det[inside]
        return u, (log_det + self.log_jacobian).float()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x_phys = self._states(batch)
        u, exact = self._normalised(x_phys)
        if u.shape[0] == 0:
            return
        generator = torch.Generator(device=u.device).manual_seed(batch_idx)
        terms = self.evaluated.elbo_terms(u, generator)
        elbo, _ = mixture_bound(terms.elbo)
        iwae_members, errors = self.member_bounds(u, self.hparams.val_k, generator)
        iwae, _ = mixture_bound(iwae_members, errors)
        metrics = {
            "val/elbo": -(elbo + exact).mean(),
            "val/recon": -terms.recon.mean(),
            "val/kl": terms.kl.mean(),
            "val/iwae": -(iwae + exact).mean(),
            "val/iwae_phys": -(iwae + exact).mean() + self.log_jacobian,
        }
        if self.evaluated.size > 1:
            metrics["val/member_spread"] = iwae_members.std(dim=0).mean()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=u.shape[0],
                      prog_bar=False)
        if batch_idx == 0:
            self.val_examples = x_phys[:4].detach()

    def on_validation_end(self) -> None:
        """After the epoch's metrics are reduced: the hp metric (best val/iwae) and figures."""
        if self.trainer.sanity_checking:
            return
        current = self.trainer.callback_metrics.get("val/iwae")
        if current is not None and math.isfinite(float(current)):
            self.best_val_iwae = min(self.best_val_iwae, float(current))
        if not self.trainer.is_global_zero:
            return
        from ebm_vae.model.monitor import log_figures

        for logger in self.loggers:
            if math.isfinite(self.best_val_iwae):
                self._log_hparams(logger)
                logger.log_metrics({"hp_metric": self.best_val_iwae}, step=self.global_step)
            log_figures(self, logger)

    def on_fit_start(self) -> None:
        self._hparams_logged = False
        if self.trainer.is_global_zero and math.isfinite(self.best_val_iwae):  # a resumed run
            for logger in self.loggers:
                self._log_hparams(logger)

    def _log_hparams(self, logger: Any) -> None:
        """TensorBoard's hparams table: a flat summary with the best val/iwae as its metric,
        written once a finite value exists (an inf first point would flatten the curve)."""
        if self._hparams_logged:
            return
        h = self.hparams
        summary = {
            "capsule": h.capsule.get("name", ""), "state_shape": "x".join(map(str, self.state_info.shape)),
            "core_shape": "x".join(map(str, self.transform.out_shape)), "arch": h.arch,
            "latent_dim": h.latent_dim, "hidden": h.hidden, "n_layers": h.n_layers, "channels": h.channels,
            "prior": h.prior, "members": h.members, "train_k": h.train_k, "lr": h.lr,
            "lr_schedule": h.lr_schedule, "warmup_steps": h.warmup_steps, "ema_decay": h.ema_decay,
            "weight_decay": h.weight_decay, "val_k": h.val_k, "kl_warmup_steps": h.kl_warmup_steps,
            "min_logvar": h.min_logvar, "train_samples": h.stats_meta.get("count", 0),
            "parameters": sum(p.numel() for p in self.members.parameters()),
            "max_steps": self.trainer.max_steps,
        }
        logger.log_hyperparams(summary, {"hp_metric": self.best_val_iwae})
        self._hparams_logged = True

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.members.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        total = self.trainer.max_steps if self._trainer is not None else -1
        cosine = self.hparams.lr_schedule == "cosine" and total > warmup

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_iwae"] = self.best_val_iwae

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_val_iwae = float(checkpoint.get("best_val_iwae", math.inf))
