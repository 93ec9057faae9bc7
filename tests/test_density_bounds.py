"""The bound functions and gradient estimators on a linear-Gaussian model with an analytic log p(x).

z ~ N(0, I_2), x | z ~ N(W z + b, s^2 I_3), so p(x) = N(b, W W^T + s^2 I) (scipy gives the
reference). q(z | x) = N(m, diag(sigma^2)) is deliberately not the exact posterior.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import multivariate_normal

from runner.losses.iwae import dreg_surrogate, elbo_bound, iwae_bound
from runner.metrics.density import log_mean_exp_chunked

D, S, NOISE = 3, 2, 0.7


def gaussian(value, mean, log_std):
    return (-0.5 * ((value - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


@pytest.fixture
def lg():
    """Parameters (float64, requiring grad), data points x [B, D], and the exact log p(x)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, S, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(4, D, generator=g, dtype=torch.float64) * 1.5
    cov = (W @ W.T + NOISE ** 2 * torch.eye(D, dtype=torch.float64)).numpy()
    log_px = torch.tensor(multivariate_normal(b.numpy(), cov).logpdf(x.numpy()))
    # Exact posterior, then moved away from it: q is a fair but imperfect proposal.
    post_cov = torch.linalg.inv(torch.eye(S, dtype=torch.float64) + W.T @ W / NOISE ** 2)
    post_mean = (x - b) @ W @ post_cov / NOISE ** 2
    m = post_mean + 0.15
    log_std = 0.5 * torch.log(torch.diagonal(post_cov)).expand(len(x), S) + 0.2
    params = {name: t.clone().requires_grad_() for name, t in dict(W=W, b=b, m=m, log_std=log_std).items()}
    return params, x, log_px


def log_weights(params, x, eps, stop_q=False):
    """log p(x, z) - log q(z | x) for z = m + sigma * eps; eps [k, ..., B, S]. Returns (log_w, z)."""
    W, b, m, log_std = params["W"], params["b"], params["m"], params["log_std"]
    z = m + log_std.exp() * eps
    log_p = gaussian(x, z @ W.T + b, torch.full((D,), math.log(NOISE), dtype=torch.float64)) \
        + gaussian(z, torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64))
    q_m, q_log_std = (m.detach(), log_std.detach()) if stop_q else (m, log_std)
    return log_p - gaussian(z, q_m, q_log_std), z


def draw(k, *shape, seed=1):
    return torch.randn(k, *shape, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_k1_iwae_equals_elbo_and_iwae_dominates_elbo(lg):
    params, x, _ = lg
    log_w, _ = log_weights(params, x, draw(1, len(x)))
    torch.testing.assert_close(iwae_bound(log_w), elbo_bound(log_w), rtol=0, atol=1e-12)
    log_w, _ = log_weights(params, x, draw(20, 100, len(x)))
    assert (iwae_bound(log_w) >= elbo_bound(log_w) - 1e-12).all()  # Jensen, draw by draw


def test_bound_rises_with_k_towards_log_px(lg):
    params, x, log_px = lg
    draws = 2000
    with torch.no_grad():
        means = {k: iwae_bound(log_weights(params, x, draw(k, draws, len(x), seed=k))[0]).mean(0) for k in (1, 5, 50)}
    gaps = {k: (log_px - v) for k, v in means.items()}
    assert (gaps[1] > gaps[5]).all() and (gaps[5] > gaps[50]).all()
    assert (gaps[50] > -0.01).all()  # a lower bound on average (MC error is ~1e-3 here)
    assert (gaps[50] < 0.25 * gaps[1]).all()


def test_k5000_estimate_matches_log_px_and_chunking_is_exact(lg):
    params, x, log_px = lg
    with torch.no_grad():
        log_w, _ = log_weights(params, x, draw(5000, len(x), seed=3))
    # The estimate's standard deviation is about sd(w / E w) / sqrt(k), estimated from the weights.
    relative = torch.exp(log_w - log_w.logsumexp(0) + math.log(5000))
    tolerance = 4 * relative.std(0) / math.sqrt(5000)
    assert (tolerance < 0.05).all()
    assert ((iwae_bound(log_w) - log_px).abs() < tolerance).all(), (iwae_bound(log_w) - log_px, tolerance)
    sliced = iter(torch.split(log_w, 700))  # 700 does not divide 5000: a short last chunk
    chunked = log_mean_exp_chunked(lambda n: next(sliced)[:n], 5000, 700)
    torch.testing.assert_close(chunked, iwae_bound(log_w), rtol=0, atol=1e-10)


def _grads(loss, params):
    return torch.autograd.grad(loss, list(params.values()), retain_graph=True)


def test_practitioners_formula_needs_stop_gradient(lg):
    params, x, _ = lg
    log_w, _ = log_weights(params, x, draw(7, len(x), seed=4))
    reference = _grads(iwae_bound(log_w).sum(), params)
    weights = torch.softmax(log_w, 0)
    with_stop = _grads((weights.detach() * log_w).sum(), params)
    for r, g in zip(reference, with_stop):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    without_stop = _grads((weights * log_w).sum(), params)
    assert not all(torch.allclose(g, r, rtol=1e-3) for r, g in zip(reference, without_stop))


def test_dreg_surrogate_value_decoder_gradient_and_explicit_formula(lg):
    params, x, _ = lg
    eps = draw(6, len(x), seed=5)
    log_w, _ = log_weights(params, x, eps)
    iwae_grads = dict(zip(params, _grads(iwae_bound(log_w).sum(), params)))
    log_w_sg, z = log_weights(params, x, eps, stop_q=True)
    surrogate = dreg_surrogate(log_w_sg, [z])
    torch.testing.assert_close(surrogate, iwae_bound(log_w), rtol=0, atol=1e-12)  # value = IWAE bound
    dreg = dict(zip(params, _grads(surrogate.sum(), params)))
    for name in ("W", "b"):  # decoder: the IWAE gradient
        torch.testing.assert_close(dreg[name], iwae_grads[name], rtol=1e-10, atol=1e-12)
    # Encoder: sum_i w~_i^2 (d log w_i / d z_i) (d z_i / d phi), written out by hand.
    log_w_sg, z = log_weights(params, x, eps, stop_q=True)
    dlogw_dz, = torch.autograd.grad(log_w_sg.sum(), z)
    w2 = torch.softmax(log_w_sg.detach(), 0).unsqueeze(-1) ** 2
    torch.testing.assert_close(dreg["m"], (w2 * dlogw_dz).sum(0), rtol=1e-10, atol=1e-12)
    sigma = params["log_std"].detach().exp()
    torch.testing.assert_close(dreg["log_std"], (w2 * dlogw_dz * sigma * eps).sum(0), rtol=1e-10, atol=1e-12)


def test_dreg_encoder_gradient_is_unbiased(lg):
    """Mean over many draws of DReG's encoder gradient = mean of the IWAE reparameterised one.

    Each draw gets its own copy of q's parameters, so one backward gives per-draw gradients and
    the comparison can use the standard error of the paired differences."""
    params, x, _ = lg
    draws, k = 20000, 5
    per_draw = {n: (t.detach().expand(draws, *t.shape).clone().requires_grad_() if n in ("m", "log_std")
                    else t) for n, t in params.items()}
    q = [per_draw["m"], per_draw["log_std"]]
    eps = draw(k, draws, len(x), seed=6)
    log_w, _ = log_weights(per_draw, x, eps)
    iwae = torch.cat([g.reshape(draws, -1) for g in torch.autograd.grad(iwae_bound(log_w).sum(), q)], 1)
    log_w_sg, z = log_weights(per_draw, x, eps, stop_q=True)
    dreg = torch.cat([g.reshape(draws, -1) for g in torch.autograd.grad(dreg_surrogate(log_w_sg, [z]).sum(), q)], 1)
    diff = dreg - iwae
    standard_error = diff.std(0) / math.sqrt(draws)
    assert (diff.mean(0).abs() < 4.5 * standard_error + 1e-12).all(), (diff.mean(0), standard_error)
    # Not vacuous: the gradients are far from zero relative to that error.
    assert (iwae.mean(0).abs() > 10 * standard_error).sum() >= iwae.shape[1] // 2
    # And DReG has the smaller variance on the encoder (its point).
    assert (dreg.var(0) < iwae.var(0)).float().mean() > 0.75
