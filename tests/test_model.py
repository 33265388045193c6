"""The VAE's bounds against closed forms: hand-computed ELBO, exact IWAE, a Gaussian's entropy;
the flow prior, the ensemble's mixture bound, the support reservoir."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ebm_vae.callbacks import ValidateAtEnd
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.model.elbo import elbo_terms, iwae_bound, mixture_bound
from ebm_vae.model.ensemble import bootstrap_counts
from ebm_vae.model.networks import build_networks
from ebm_vae.model.vae import VAE

VECTOR = StateInfo("vector", (3,), ("a", "b", "c"), ("m", "s", "K")).to_dict()


@pytest.mark.filterwarnings("ignore:.*self.log.*")  # training_step outside a Trainer
def test_training_loss_is_the_hand_computed_negative_elbo():
    torch.manual_seed(0)
    model = VAE(VECTOR, latent_dim=2, hidden=8, n_layers=1, members=1, prior="standard")
    x = torch.randn(4, 3) * 2.0

    torch.manual_seed(123)
    loss = model.training_step(x, 0)
    torch.manual_seed(123)
    eps = torch.randn(1, 1, 4, 2)[0, 0].double().numpy()  # the draw training_step made

    with torch.no_grad():
        mu, logvar = (t[0].double().numpy() for t in model.members.encoder(x))
        z = mu + np.exp(0.5 * logvar) * eps
        mean, raw = (t[0].double().numpy() for t in model.members.decoder(torch.from_numpy(z).float()[None]))
    floor = model.hparams.min_logvar
    dec_logvar = floor + np.log1p(np.exp(raw - floor))  # softplus floor, far below the cap here
    xs = x.double().numpy()
    log_px_z = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * dec_logvar
                      - 0.5 * (xs - mean) ** 2 / np.exp(dec_logvar), axis=1)
    kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar, axis=1)
    assert float(loss.detach()) == pytest.approx(float(np.mean(kl - log_px_z)), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_kl_warmup_scales_only_the_training_kl():
    torch.manual_seed(0)
    model = VAE(VECTOR, latent_dim=2, hidden=8, n_layers=1, kl_warmup_steps=10, members=1, ema_decay=0.0)
    x = torch.randn(16, 3)
    assert model.kl_weight() == pytest.approx(0.1)  # step 0 of 10
    torch.manual_seed(1)
    loss = model.training_step(x, 0)
    torch.manual_seed(1)
    terms = model.members.elbo_terms(x)
    assert float(loss.detach()) == pytest.approx(float(-(terms.recon - 0.1 * terms.kl).mean()), rel=1e-6)
    torch.manual_seed(1)
    assert model.log_prob_bound(x).mean() == pytest.approx(float(terms.elbo.mean()), rel=1e-6)


def exact_posterior_model(a: float, s: float):
    """p(z) = N(0, 1), p(x|z) = N(a z, s^2) with its exact posterior as q(z|x)."""
    prior_var = a * a + s * s

    def encoder(x):  # one member: (1, N, 1)
        mu = (a * x / prior_var)[None]
        return mu, torch.full_like(mu, math.log(s * s / prior_var))

    def decoder(z):  # (1, R, 1) -> (1, R, 1)
        return a * z, torch.full_like(z, math.log(s * s))

    return encoder, decoder, prior_var


def test_iwae_is_exact_under_the_true_posterior_for_any_k_and_chunking():
    encoder, decoder, var = exact_posterior_model(a=1.7, s=0.4)
    x = torch.linspace(-3, 3, 7).reshape(7, 1)
    log_px = -0.5 * (math.log(2 * math.pi * var) + x[:, 0].double() ** 2 / var)
    gen = torch.Generator().manual_seed(0)
    for k, max_rows in ((1, 100), (5, 100), (64, 7), (64, 10_000)):
        bound = iwae_bound(x, encoder(x), decoder, k, gen, max_rows=max_rows)
        torch.testing.assert_close(bound[0].double(), log_px, atol=1e-5, rtol=0)
    # the single-draw ELBO (exact KL) is unbiased for log p(x) here
    xs = x.repeat(20000, 1)
    elbo = elbo_terms(xs, encoder(xs), decoder, gen).elbo.view(20000, 7).mean(0)
    torch.testing.assert_close(elbo.double(), log_px, atol=0.02, rtol=0)


def test_iwae_is_above_the_elbo_and_rises_with_k():
    torch.manual_seed(0)
    model = VAE(VECTOR, latent_dim=2, hidden=16, n_layers=1, prior="standard")
    x = torch.randn(2000, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    means = [float(model.log_prob_bound(x, k=k, generator=gen).mean()) for k in (1, 4, 16, 64)]
    assert all(lo < hi for lo, hi in zip(means, means[1:], strict=False)), means
    assert means[-1] - means[0] > 0.05  # an untrained model has a visible gap


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_bounds_stay_finite_on_outliers():
    torch.manual_seed(0)
    model = VAE(VECTOR, hidden=8, n_layers=1)
    x = torch.tensor([[1e6, -1e6, 0.0], [3e4, 0.0, -7e5], [0.0, 0.0, 0.0]])
    for k in (1, 8):
        assert torch.isfinite(model.log_prob_bound(x, k=k)).all()
    loss = model.training_step(x, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.members.parameters())


def test_bf16_autocast_leaves_the_bound_in_float32():
    """The layers may run in bf16; the output heads and the bound stay float32."""
    torch.manual_seed(0)
    model = VAE(StateInfo.field(["Bx", "By"], ["T", "T"], (16, 16)).to_dict(), channels=4, members=2)
    x = torch.randn(8, 2, 16, 16)
    exact = model.log_prob_bound(x, k=4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.log_prob_bound(x, k=4, generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 17, 9), (2, 1, 30), (1, 4, 4)])
def test_conv_networks_reproduce_any_field_shape(shape):
    encoder, decoder = build_networks("conv", 3, shape, latent_dim=5, hidden=8, n_layers=1, channels=4)
    mu, logvar = encoder(torch.randn(2, *shape))
    assert mu.shape == logvar.shape == (3, 2, 5)
    mean, dec_logvar = decoder(mu)
    assert mean.shape == dec_logvar.shape == (3, 2, math.prod(shape))


def test_architecture_follows_the_state_kind():
    field = StateInfo.field(["T"], ["K"], (8, 8)).to_dict()
    assert VAE(field).hparams.arch == "conv"
    assert VAE(VECTOR).hparams.arch == "mlp"
    assert VAE(field, arch="mlp").hparams.arch == "mlp"
    with pytest.raises(ValueError, match="conv"):
        VAE(VECTOR, arch="conv")


def test_trained_model_reaches_the_entropy_of_a_correlated_gaussian():
    """val/iwae of a VAE trained on a correlated 2-D Gaussian is its entropy (z-scored units),
    and val/iwae_phys the entropy in physical units."""
    L.seed_everything(0)
    rho, mean, std = 0.8, np.array([50.0, 0.1]), np.array([0.02, 0.3])
    cov = np.array([[1.0, rho], [rho, 1.0]]) * np.outer(std, std)
    rng = np.random.default_rng(0)
    x_phys = rng.multivariate_normal(mean, cov, size=104_000).astype(np.float32)
    h_phys = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov))
    h_z = h_phys - float(np.sum(np.log(std)))  # entropy of (x - mean) / std

    state = StateInfo("vector", (2,), ("frequency", "phase_angle"), ("Hz", "rad")).to_dict()
    model = VAE(state, hidden=64, lr=3e-3, val_k=64)
    model.set_normalization(SimpleNamespace(mean=mean, std=std, pca=None))
    x = torch.from_numpy(x_phys)  # batches in physical units: the model z-scores them
    train = DataLoader(TensorDataset(x[:100_000]), batch_size=512, shuffle=True)
    val = DataLoader(TensorDataset(x[100_000:]), batch_size=4_000)
    trainer = L.Trainer(max_steps=400, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, train)
    metrics = trainer.validate(model, val, verbose=False)[0]  # once, at the end (k = 64 on 4,000 states)
    assert float(metrics["val/iwae"]) == pytest.approx(h_z, abs=0.1)
    assert float(metrics["val/iwae_phys"]) == pytest.approx(h_phys, abs=0.1)
    assert model.log_jacobian == pytest.approx(float(np.sum(np.log(std))), rel=1e-6)


def test_flow_prior_is_normalised_autoregressive_and_invertible():
    from ebm_vae.model.priors import FlowPrior

    torch.manual_seed(0)
    for dim in (1, 2, 4):
        prior = FlowPrior(3, dim, transforms=3, bins=6, hidden=16)
        for layer, conditioner in enumerate(prior.conditioners):  # outputs of feature i see only earlier features
            y = torch.randn(3, 1, dim)
            jac = torch.autograd.functional.jacobian(lambda v, c=conditioner, d=dim: c(v).unflatten(-1, (d, 17)).sum(-1), y)
            rank = torch.arange(dim) if layer % 2 == 0 else torch.arange(dim).flip(0)
            seen = jac[0, 0, :, 0, 0, :].abs() > 0
            assert not (seen & ~(rank[None, :] < rank[:, None])).any()
        eps = torch.randn(3, 50, dim)
        z = prior.from_base(eps)
        y = z
        for conditioner in prior.conditioners:
            y, _ = prior._spline(conditioner, y).call_and_ladj(y)
        torch.testing.assert_close(y, eps, atol=1e-4, rtol=0)
    prior = FlowPrior(2, 2, transforms=2, bins=8, hidden=16)
    ticks = torch.linspace(-9, 9, 401)
    grid = torch.cartesian_prod(ticks, ticks)
    mass = prior.log_prob(grid.expand(2, -1, -1)).exp().sum(1) * (ticks[1] - ticks[0]) ** 2
    torch.testing.assert_close(mass, torch.ones(2), atol=2e-3, rtol=0)


def test_mixture_bound_is_the_log_mean_of_the_members_and_its_delta_method_error():
    bounds = torch.tensor([[-1.0, -3.0], [-2.0, -3.0], [-4.0, -3.0]])
    errors = torch.tensor([[0.1, 0.2], [0.3, 0.2], [0.0, 0.2]])
    bound, stderr = mixture_bound(bounds, errors)
    expected = torch.log(bounds.exp().mean(0))
    torch.testing.assert_close(bound, expected)
    p = bounds.exp()  # sd of each member's estimate of p_m is se_m * p_m
    torch.testing.assert_close(stderr, torch.sqrt(((errors * p) ** 2).sum(0)) / p.sum(0))
    assert torch.isnan(mixture_bound(bounds)[1]).all()  # ELBOs carry no standard error


def test_ensemble_members_are_independent_and_bootstrapped():
    torch.manual_seed(0)
    model = VAE(VECTOR, hidden=8, n_layers=1, members=3)
    weights = model.members.encoder.net[0].weight
    assert weights.shape[0] == 3 and not torch.allclose(weights[0], weights[1])
    x = torch.randn(256, 3)
    torch.manual_seed(5)
    objective, plain = model.training_loss(x)
    torch.manual_seed(5)
    terms = model.members.elbo_terms(x)
    per_sample = terms.recon - terms.kl
    counts = bootstrap_counts(x, 3, seed=0)
    assert not torch.equal(counts[0], counts[1])  # each member its own resample
    torch.testing.assert_close(objective, -(counts * per_sample).mean(1).sum())
    torch.testing.assert_close(plain, -per_sample.mean())


def test_bootstrap_counts_are_poisson_and_fixed_per_state():
    """A state keeps its count in every epoch and batch: each member fits one resample."""
    x = torch.randn(50_000, 2)
    counts = bootstrap_counts(x, 4, seed=0)
    assert counts.shape == (4, 50_000)
    torch.testing.assert_close(counts.mean(1), torch.ones(4), atol=0.03, rtol=0)
    torch.testing.assert_close(counts.var(1), torch.ones(4), atol=0.05, rtol=0)
    assert torch.equal(bootstrap_counts(x[torch.arange(99, -1, -1)], 4, seed=0), counts[:, :100].flip(1))
    assert not torch.equal(bootstrap_counts(x[:100], 4, seed=1), counts[:, :100])
    assert abs(float(torch.corrcoef(counts)[0, 1])) < 0.03  # members resample independently


def test_moving_average_answers_queries_and_travels_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VAE(VECTOR, hidden=8, n_layers=1, members=2, ema_decay=0.5)
    with torch.no_grad():
        for p in model.members.parameters():
            p.add_(1.0)
    model.update_ema()  # step 0: decay min(0.5, 1/10) = 0.1
    trained, averaged = next(model.members.parameters()), next(model.ema.parameters())
    assert not averaged.requires_grad
    torch.testing.assert_close(averaged, trained - 0.1)
    assert model.evaluated is model.ema
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    fresh = VAE(VECTOR, hidden=8, n_layers=1, members=2, ema_decay=0.5)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"])
    torch.testing.assert_close(next(fresh.ema.parameters()), averaged)


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    model = VAE(VECTOR, hidden=8, n_layers=1, lr=1e-2, warmup_steps=10)
    model._trainer = SimpleNamespace(max_steps=110)
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(111):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    model._trainer = None
    assert rates[0] == pytest.approx(1e-3) and rates[9] == pytest.approx(1e-2)
    assert rates[60] == pytest.approx(0.5e-2) and rates[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))


def test_sizes_follow_the_data():
    from ebm_vae.model.vae import auto_width

    assert auto_width(10_000, 2) <= auto_width(200_000, 2) <= auto_width(10**7, 2) <= 256
    assert auto_width(0, 2) >= 32
    model = VAE(VECTOR, stats_meta={"count": 200_000})
    assert model.hparams.hidden == auto_width(200_000, 3)
    assert model.hparams.latent_dim == 3 and model.members.encoder.residual  # the core's own size


def test_tensorboard_shows_labelled_slices_and_a_finite_hp_metric(tmp_path):
    """Curves, the slice figure (energy and uncertainty panels) and hparams of a short fit:
    no inf first point of hp_metric, a validation point per interval."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    L.seed_everything(0)
    state = StateInfo("vector", (2,), ("frequency", "phase_angle"), ("Hz", "rad")).to_dict()
    model = VAE(state, hidden=8, members=2, prior_transforms=1, val_k=2, warmup_steps=2)
    x = torch.randn(512, 2) * torch.tensor([0.02, 1.0]) + torch.tensor([50.0, 0.0])
    model.set_normalization(SimpleNamespace(mean=x.mean(0).numpy(), std=x.std(0).numpy(), pca=None))
    logger = TensorBoardLogger(tmp_path, name="grid", version="", default_hp_metric=False)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", callbacks=[ValidateAtEnd()])
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=64, shuffle=True),
                DataLoader(TensorDataset(x[:128]), batch_size=128))
    values: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((tmp_path / "grid").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else math.nan
                if value.HasField("tensor") and value.tensor.float_val:
                    number = value.tensor.float_val[0]
                values.setdefault(value.tag, []).append((event.step, number))
    assert len(values["val/iwae"]) >= 3  # steps 2, 4, 6
    assert all(math.isfinite(v) for _, v in values["hp_metric"]), values["hp_metric"]
    assert "val/energy_slice" in values and "val/member_spread" in values
