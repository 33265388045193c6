"""The VAE's bounds against closed forms: hand-computed ELBO, exact IWAE, a Gaussian's entropy."""

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
from ebm_vae.model.bounds import elbo_terms, iwae_bound
from ebm_vae.model.networks import build_networks
from ebm_vae.model.vae import VAE

VECTOR = StateInfo("vector", (3,), ("a", "b", "c"), ("m", "s", "K")).to_dict()


@pytest.mark.filterwarnings("ignore:.*self.log.*")  # training_step outside a Trainer
def test_training_loss_is_the_hand_computed_negative_elbo():
    torch.manual_seed(0)
    model = VAE(VECTOR, latent_dim=2, hidden=8, n_layers=1)
    x = torch.randn(4, 3) * 2.0

    torch.manual_seed(123)
    loss = model.training_step(x, 0)
    torch.manual_seed(123)
    eps = torch.randn(1, 4, 2)[0].double().numpy()  # the draw training_step made

    with torch.no_grad():
        mu, logvar = (t.double().numpy() for t in model.encoder(x))
        z = mu + np.exp(0.5 * logvar) * eps
        mean, raw = (t.double().numpy() for t in model.decoder(torch.from_numpy(z).float()))
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
    model = VAE(VECTOR, latent_dim=2, hidden=8, n_layers=1, kl_warmup_steps=10)
    x = torch.randn(16, 3)
    assert model.kl_weight() == pytest.approx(0.1)  # step 0 of 10
    torch.manual_seed(1)
    loss = model.training_step(x, 0)
    torch.manual_seed(1)
    terms = model.elbo_terms(x)
    assert float(loss.detach()) == pytest.approx(float(-(terms.recon - 0.1 * terms.kl).mean()), rel=1e-6)
    torch.manual_seed(1)
    assert model.log_prob_bound(x).mean() == pytest.approx(float(terms.elbo.mean()), rel=1e-6)


def exact_posterior_model(a: float, s: float):
    """p(z) = N(0, 1), p(x|z) = N(a z, s^2) with its exact posterior as q(z|x)."""
    prior_var = a * a + s * s

    def encoder(x):
        mu = a * x / prior_var
        return mu, torch.full_like(mu, math.log(s * s / prior_var))

    def decoder(z):
        return a * z, torch.full_like(z, math.log(s * s))

    return encoder, decoder, prior_var


def test_iwae_is_exact_under_the_true_posterior_for_any_k_and_chunking():
    encoder, decoder, var = exact_posterior_model(a=1.7, s=0.4)
    x = torch.linspace(-3, 3, 7).reshape(7, 1)
    log_px = -0.5 * (math.log(2 * math.pi * var) + x[:, 0].double() ** 2 / var)
    gen = torch.Generator().manual_seed(0)
    for k, max_rows in ((1, 100), (5, 100), (64, 7), (64, 10_000)):
        bound = iwae_bound(x, encoder(x), decoder, k, gen, max_rows=max_rows)
        torch.testing.assert_close(bound.double(), log_px, atol=1e-5, rtol=0)
    # the single-draw ELBO (exact KL) is unbiased for log p(x) here
    xs = x.repeat(20000, 1)
    elbo = elbo_terms(xs, encoder(xs), decoder, gen).elbo.view(20000, 7).mean(0)
    torch.testing.assert_close(elbo.double(), log_px, atol=0.02, rtol=0)


def test_iwae_is_above_the_elbo_and_rises_with_k():
    torch.manual_seed(0)
    model = VAE(VECTOR, latent_dim=2, hidden=16, n_layers=1)
    x = torch.randn(2000, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    means = [float(model.log_prob_bound(x, k=k, generator=gen).mean()) for k in (1, 4, 16, 64)]
    assert all(lo < hi for lo, hi in zip(means, means[1:], strict=False)), means
    assert means[-1] - means[0] > 0.05  # an untrained model has a visible gap


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_bounds_stay_finite_on_outliers():
    torch.manual_seed(0)
    model = VAE(VECTOR, latent_dim=2, hidden=8, n_layers=1)
    x = torch.tensor([[1e6, -1e6, 0.0], [3e4, 0.0, -7e5], [0.0, 0.0, 0.0]])
    for k in (1, 8):
        assert torch.isfinite(model.log_prob_bound(x, k=k)).all()
    loss = model.training_step(x, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_autocast_leaves_the_bound_in_float32():
    """The layers may run in bf16; the output heads and the bound stay float32."""
    torch.manual_seed(0)
    model = VAE(StateInfo.field(["Bx", "By"], ["T", "T"], (16, 16)).to_dict(), channels=4)
    x = torch.randn(8, 2, 16, 16)
    exact = model.log_prob_bound(x, k=4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.log_prob_bound(x, k=4, generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 17, 9), (2, 1, 30), (1, 4, 4)])
def test_conv_networks_reproduce_any_field_shape(shape):
    encoder, decoder = build_networks("conv", shape, latent_dim=5, hidden=8, n_layers=1, channels=4)
    mu, logvar = encoder(torch.randn(2, *shape))
    assert mu.shape == logvar.shape == (2, 5)
    mean, dec_logvar = decoder(mu)
    assert mean.shape == dec_logvar.shape == (2, *shape)


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
    model = VAE(state, hidden=64, lr=3e-3, val_k=256)
    model.set_normalization(SimpleNamespace(mean=mean, std=std, pca=None))
    x = torch.from_numpy(x_phys)  # batches in physical units: the model z-scores them
    train = DataLoader(TensorDataset(x[:100_000]), batch_size=512, shuffle=True)
    val = DataLoader(TensorDataset(x[100_000:]), batch_size=4_000)
    trainer = L.Trainer(max_steps=400, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", callbacks=[ValidateAtEnd()])
    trainer.fit(model, train, val)
    metrics = trainer.callback_metrics
    assert float(metrics["val/iwae"]) == pytest.approx(h_z, abs=0.1)
    assert float(metrics["val/iwae_phys"]) == pytest.approx(h_phys, abs=0.1)
    assert model.log_jacobian == pytest.approx(float(np.sum(np.log(std))), rel=1e-6)
