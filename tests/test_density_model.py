"""The VAE model, the losses through it, the evaluator's metrics and the family's train_loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from runner.config.build import build
from runner.data.binarized import silhouettes
from runner.errors import UserError
from runner.families.density import DensityFamily
from runner.families.density import build as density_family
from runner.losses.iwae import DReG, IWAE, iwae_bound
from runner.metrics.density import DensityEvaluator, chunk_for_budget
from runner.models.vae import VAE


def tiny_vae2(seed=0):
    torch.manual_seed(seed)
    return VAE(x_dim=6, latent_dims=[3, 2], hidden_dims=[[5], [4]]).double()


def binary_batch(n, dim, seed=0):
    return torch.bernoulli(torch.full((n, dim), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("latent_dims,hidden_dims", [([50], [[200, 200]]), ([100, 50], [[200, 200], [100, 100]])])
def test_encoder_runs_once_per_data_point(latent_dims, hidden_dims):
    model = VAE(784, latent_dims, hidden_dims)
    calls = []
    model.encoders[0].register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    x = torch.bernoulli(torch.full((7, 784), 0.3))
    out = model(x, 11)
    assert calls == [(7, 784)]  # one pass over the 7 data points, not 7 x 11
    assert out["log_w"].shape == (11, 7)
    assert [tuple(z.shape) for z in out["latents"]] == [(11, 7, d) for d in latent_dims]


def test_paper_architectures_from_configs():
    sizes = lambda mlp: [layer.in_features for layer in mlp.layers] + [mlp.layers[-1].out_features]
    one = build(OmegaConf.load("runner/conf/model/vae1.yaml"), "model", x_dim=784)
    assert sizes(one.encoders[0]) == [784, 200, 200, 100] and sizes(one.decoders[0]) == [50, 200, 200, 784]
    two = build(OmegaConf.load("runner/conf/model/vae2.yaml"), "model", x_dim=784)
    assert sizes(two.encoders[0]) == [784, 200, 200, 200] and sizes(two.encoders[1]) == [100, 100, 100, 100]
    assert sizes(two.decoders[1]) == [50, 100, 100, 200] and sizes(two.decoders[0]) == [100, 200, 200, 784]


def test_output_bias_is_logit_of_clipped_training_mean():
    mean = torch.tensor([0.0, 0.5, 0.9, 1.0])
    model = VAE(4, [2], [[3]], train_mean=mean)
    p = np.clip(mean.numpy().astype(np.float64), 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(model.decoders[0].layers[-1].bias.detach().numpy(), np.log(p / (1 - p)), rtol=1e-6)


def test_log_weights_match_a_hand_computation():
    model = tiny_vae2()
    x = binary_batch(3, 6)
    g = torch.Generator().manual_seed(1)
    out = model(x, 4, generator=g)
    g = torch.Generator().manual_seed(1)
    eps1 = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    eps2 = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    normal = lambda v, m, lv: torch.distributions.Normal(m, (0.5 * lv).exp()).log_prob(v).sum(-1)
    m1, lv1 = model.encoders[0](x).chunk(2, -1)
    z1 = m1 + (0.5 * lv1).exp() * eps1
    m2, lv2 = model.encoders[1](z1).chunk(2, -1)
    z2 = m2 + (0.5 * lv2).exp() * eps2
    pm1, plv1 = model.decoders[1](z2).chunk(2, -1)
    log_px = torch.distributions.Bernoulli(logits=model.decoders[0](z1)).log_prob(x).sum(-1)
    expected = log_px + normal(z1, pm1, plv1) + normal(z2, torch.zeros(2), torch.zeros(2)) \
        - normal(z1, m1, lv1) - normal(z2, m2, lv2)
    torch.testing.assert_close(out["log_w"], expected, rtol=1e-10, atol=1e-10)


def test_dreg_through_two_stochastic_layers_matches_its_definition():
    """Hooked surrogate = sum_i stop(w~_i^2) log w_i (q stopped) on the encoder, and the IWAE
    gradient on the decoder; the values equal the IWAE bound."""
    model = tiny_vae2()
    x = binary_batch(5, 6)
    encoder = list(model.encoders.parameters())
    decoder = list(model.decoders.parameters())

    def run(stop_q):
        return model(x, 7, stop_q, generator=torch.Generator().manual_seed(2))

    plain = run(False)
    iwae_grads = torch.autograd.grad(iwae_bound(plain["log_w"]).sum(), decoder)
    out = run(True)
    torch.testing.assert_close(out["log_w"], plain["log_w"].detach(), rtol=0, atol=1e-12)
    loss = DReG(k=7)(out)
    torch.testing.assert_close(-loss, iwae_bound(plain["log_w"]).detach(), rtol=0, atol=1e-12)
    hooked = torch.autograd.grad(loss.sum(), encoder + decoder)
    out = run(True)
    w2 = torch.softmax(out["log_w"].detach(), 0) ** 2
    reference = torch.autograd.grad(-(w2 * out["log_w"]).sum(), encoder)
    for h, r in zip(hooked[:len(encoder)], reference):
        torch.testing.assert_close(h, r, rtol=1e-9, atol=1e-12)
    for h, r in zip(hooked[len(encoder):], iwae_grads):
        torch.testing.assert_close(h, -r, rtol=1e-9, atol=1e-12)


def test_dreg_unbiased_for_two_stochastic_layers():
    """Mean DReG encoder gradient = mean IWAE encoder gradient over many draws (paired, in groups)."""
    model = tiny_vae2()
    x = binary_batch(1, 6).expand(1000, 6)
    encoder = list(model.encoders.parameters())
    groups = []
    for seed in range(16):
        grads = []
        for loss in (IWAE(k=4), DReG(k=4)):
            out = model(x, 4, loss.stop_q, generator=torch.Generator().manual_seed(seed))
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(out).sum(), encoder)]))
        groups.append(torch.stack(grads))
    groups = torch.stack(groups)  # [groups, 2, params]
    diff = groups[:, 1] - groups[:, 0]
    standard_error = diff.std(0) / math.sqrt(len(groups))
    assert (diff.mean(0).abs() < 4.5 * standard_error + 1e-9).all()
    assert groups[:, 0].mean(0).norm() > 10 * standard_error.norm()  # not vacuous: far from zero


def constructed_vae(latent_dims, hidden_dims, silent):
    """A VAE whose posterior-mean units listed in ``silent[layer]`` are constant (zero weights)."""
    torch.manual_seed(0)
    model = VAE(10, latent_dims, hidden_dims).double()
    with torch.no_grad():
        for layer, units in silent.items():
            out = model.encoders[layer].layers[-1]
            out.weight.mul_(4)  # the other units vary strongly with the input
            out.weight[units] = 0
            out.bias[units] = 0.7
    return model


def test_active_units_exact_count_one_layer():
    model = constructed_vae([6], [[8]], {0: [1, 4, 5]})
    with torch.no_grad():  # a weak unit: variance of its mean well under 0.01
        model.encoders[0].layers[-1].weight[2] *= 1e-3
    x = binary_batch(400, 10)
    ev = DensityEvaluator(model, IWAE(k=2), nll_k=0, dim=10)
    with torch.no_grad():
        for chunk in x.split(64):
            ev.update(chunk)
    metrics = ev.compute(ev.sums, {})
    means = model.encoders[0](x)[:, :6].detach().numpy()
    expected = int((means.var(0) > 0.01).sum())
    assert expected == 2 and metrics["active_units"] == expected
    assert "active_units_1" not in metrics and "nll_k0" not in metrics


def test_active_units_per_layer_and_additive_across_processes():
    model = constructed_vae([4, 3], [[8], [6]], {0: [0], 1: [2]})
    x = binary_batch(300, 10)
    whole = DensityEvaluator(model, IWAE(k=2), nll_k=0, dim=10)
    halves = [DensityEvaluator(model, IWAE(k=2), nll_k=0, dim=10) for _ in range(2)]
    with torch.no_grad():
        whole.update(x)
        halves[0].update(x[:100])
        halves[1].update(x[100:])
    metrics = whole.compute(whole.sums, {})
    assert (metrics["active_units_1"], metrics["active_units_2"], metrics["active_units"]) == (3, 2, 5)
    summed = {key: halves[0].sums[key] + halves[1].sums[key] for key in whole.sums}
    torch.testing.assert_close(summed["mean_1"], whole.sums["mean_1"], rtol=1e-12, atol=1e-12)
    merged = halves[0].compute(summed, {})
    assert merged["active_units_1"] == 3 and merged["active_units"] == 5


def test_evaluator_nll_is_below_the_bound_and_chunk_budget():
    model = tiny_vae2()
    x = binary_batch(20, 6)
    loss = IWAE(k=3, eval_k=400, eval_budget_mb=0.01)
    assert chunk_for_budget(400, 20, 6, 0.01) < 400  # several chunks
    ev = DensityEvaluator(model, loss, nll_k=400, dim=6)
    with torch.no_grad():
        ev.update(x)
    metrics = ev.compute(ev.sums, {})
    assert metrics["loss"] == -metrics["bound"]
    assert metrics["nll_k400"] < metrics["loss"]  # more samples, tighter bound (on average; large gap here)


@pytest.mark.parametrize("key,value", [("k", 0), ("k", -3), ("eval_k", 0), ("val_eval_k", -1)])
def test_bad_loss_settings_name_the_key(key, value):
    node = OmegaConf.load("runner/conf/loss/iwae.yaml")
    node[key] = value
    with pytest.raises(UserError, match=f"loss.{key}="):
        build(node, "loss")


def family_config(loss="iwae", model="vae1"):
    return OmegaConf.create({"model": OmegaConf.load(f"runner/conf/model/{model}.yaml"),
                             "loss": OmegaConf.load(f"runner/conf/loss/{loss}.yaml")})


def build_family(config, bundle):
    return density_family(bundle, config.model, config.loss)


@pytest.mark.parametrize("loss", ["elbo", "iwae", "dreg"])
def test_a_few_adam_steps_decrease_the_loss(loss):
    bundle = silhouettes(n_train=500, n_val=0, n_test=100)
    family = build_family(family_config(loss), bundle)
    assert isinstance(family, DensityFamily)
    fixed = bundle.train.pixels[:100]

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            total, count = family.train_loss(fixed)
        return float(total) / count

    before = fixed_loss()
    optimizer = torch.optim.Adam(family.model.parameters(), lr=1e-3, eps=1e-4)
    torch.manual_seed(0)
    for step in range(20):
        batch = bundle.train.pixels[torch.randint(0, 500, (50,))]
        total, count = family.train_loss(batch)
        assert count == 50
        optimizer.zero_grad()
        (total / count).backward()
        optimizer.step()
    after = fixed_loss()
    assert after < before - 20, (before, after)


def test_dynamic_binarisation_draws_fresh_pixels_each_batch():
    family = build_family(family_config(), silhouettes(n_train=50, n_val=0, n_test=10))
    seen = []
    family.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    grey = torch.full((4, 784), 0.5)
    family.train_loss(grey)
    family.train_loss(grey)
    assert set(seen[0].unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(seen[0], seen[1])


def test_samples_plot(tmp_path):
    pytest.importorskip("matplotlib")
    family = build_family(family_config(model="vae2"), silhouettes(n_train=50, n_val=0, n_test=10))
    family.after_evaluation("test", {}, None)  # no run folder: nothing to write
    family.after_evaluation("val", {}, tmp_path)
    assert not (tmp_path / "plots").exists()
    family.after_evaluation("test", {}, tmp_path)
    assert (tmp_path / "plots" / "samples.png").stat().st_size > 1000


def test_val_is_cheap_unless_asked():
    config = family_config()
    family = build_family(config, silhouettes(n_train=50, n_val=10, n_test=10))
    assert family.evaluator("val").nll_k == 0 and family.evaluator("test").nll_k == 5000
    config.loss.val_eval_k = 30
    assert build_family(config, silhouettes(n_train=50, n_val=10, n_test=10)).evaluator("val").nll_k == 30
