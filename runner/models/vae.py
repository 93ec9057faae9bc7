"""VAE / IWAE models of Burda, Grosse & Salakhutdinov (2016): Gaussian q and prior, Bernoulli p.

``VAE(latent_dims=[50], hidden_dims=[[200, 200]])`` is the paper's one-stochastic-layer model
(784-200-200-50, decoder 50-200-200-784); ``latent_dims=[100, 50], hidden_dims=[[200, 200],
[100, 100]]`` the two-layer one (784-200-200-100, 100-100-100-50; decoder 50-100-100-100,
100-200-200-784). Hidden units are tanh; Gaussian layers output a mean and a log-variance.

``forward(x, k)`` is everything the training loss needs, in one call (the engine may wrap the
model in DDP): the first encoder runs once per data point and the k samples are drawn from its
statistics by reparameterisation (with two stochastic layers the second encoder necessarily runs
on each of the k first-layer samples). It returns the log-weights log p(x, z) - log q(z | x),
shape [k, B], and the latent samples [k, B, d] at which the gradient of log w enters (DReG
rescales the gradient there). With ``stop_q=True`` the q densities inside log w are evaluated
with q's parameters stopped (same values, different gradient), as DReG needs; the samples keep
their reparameterisation path. No host syncs or data-dependent Python branches, so a training
step can be captured in a CUDA graph. ``fused_output=True`` (model.fused_output) computes the
decoder's output layer and the pixels' log-likelihood as one Triton op that never writes the
logits (runner/models/vae_kernels.py); sampling and reconstruction keep the plain layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner.errors import UserError

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * ((z - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    return -0.5 * (z ** 2 + LOG_2PI).sum(-1)


def bernoulli_log_likelihood(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels, stable for any logits."""
    return (x * logits - F.softplus(logits)).sum(-1)


class MLP(nn.Module):
    """Linear layers with tanh between them (none after the last)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:  # Glorot & Bengio's initialisation, as in the paper
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, frozen: bool = False) -> Tensor:
        """``frozen``: use the weights with their gradient stopped (the input keeps its own)."""
        layer = self.layers[-1]
        weight, bias = (layer.weight.detach(), layer.bias.detach()) if frozen else (layer.weight, layer.bias)
        return F.linear(self.hidden(h, frozen), weight, bias)

    def hidden(self, h: Tensor, frozen: bool = False) -> Tensor:
        """The last hidden layer's activations: every layer but the last, each followed by tanh."""
        for layer in self.layers[:-1]:
            weight, bias = (layer.weight.detach(), layer.bias.detach()) if frozen else (layer.weight, layer.bias)
            h = torch.tanh(F.linear(h, weight, bias))
        return h


def _full(h: Tensor) -> Tensor:
    """At least float32 (float64 models stay float64): under autocast the layers give bf16/fp16,
    and log w sums hundreds of terms."""
    return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h


def _mean_logvar(h: Tensor) -> tuple[Tensor, Tensor]:
    mean, logvar = _full(h).chunk(2, dim=-1)
    return mean, logvar


class VAE(nn.Module):
    """A stack of Gaussian stochastic layers over Bernoulli pixels (see the module docstring)."""

    def __init__(self, x_dim: int = 784, latent_dims: list[int] = (50,), hidden_dims: list[list[int]] = ((200, 200),),
                 train_mean: Tensor | None = None, fused_output: bool = False):
        super().__init__()
        latent_dims, hidden_dims = list(latent_dims), [list(h) for h in hidden_dims]
        if not latent_dims or len(hidden_dims) != len(latent_dims):
            raise UserError(f"model.hidden_dims needs one list of hidden sizes per stochastic layer: "
                            f"{len(latent_dims)} latent_dims, {len(hidden_dims)} hidden_dims")
        if any(d <= 0 for d in latent_dims) or any(h <= 0 for hs in hidden_dims for h in hs):
            raise UserError("model.latent_dims and model.hidden_dims must hold positive sizes")
        dims = [x_dim, *latent_dims]
        self.latent_dims = latent_dims
        # encoders[i]: z_i -> (mean, logvar) of z_{i+1}  (z_0 = x)
        self.encoders = nn.ModuleList(MLP([dims[i], *hidden_dims[i], 2 * dims[i + 1]]) for i in range(len(latent_dims)))
        # decoders[i]: z_{i+1} -> Bernoulli logits of x (i = 0) or (mean, logvar) of z_i
        self.decoders = nn.ModuleList(
            MLP([dims[i + 1], *reversed(hidden_dims[i]), x_dim if i == 0 else 2 * dims[i]])
            for i in range(len(latent_dims)))
        if train_mean is not None:
            self.init_output_bias(train_mean)
        # model.fused_output: the decoder's output layer and the pixels' log-likelihood as one op
        # whose Triton kernels never write the (k x B) x x_dim logits (runner/models/vae_kernels.py;
        # eager where Triton cannot run). Imported only when asked: Triton reads TRITON_INTERPRET
        # when the kernels are built, and a CPU install needs no Triton.
        self.fused_output_loglik = None
        if fused_output:
            from runner.models.vae_kernels import output_loglik
            self.fused_output_loglik = output_loglik

    def init_output_bias(self, train_mean: Tensor) -> None:
        """Decoder output bias = logit of the clipped training mean (Burda et al.'s code)."""
        p = train_mean.detach().reshape(-1).double().clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.decoders[0].layers[-1].bias.copy_(torch.log(p) - torch.log1p(-p))

    def noise(self, k: int, batch: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """The standard normal draws of one forward pass, [k, batch, d_i] per stochastic layer, in
        the order ``encode`` uses them. Drawn before the pass, a training step's randomness is in
        its inputs: fused jobs (runner/engine/fused.py) draw each job's from its own generator."""
        weight = self.encoders[0].layers[0].weight  # the draws take the model's device and (full) dtype
        return [torch.randn((k, batch, d), device=weight.device, dtype=_full(weight).dtype, generator=generator)
                for d in self.latent_dims]

    def encode(self, x: Tensor, k: int, stop_q: bool = False, generator: torch.Generator | None = None,
               noise: list[Tensor] | None = None):
        """Sample z_1..z_L ~ q (k per data point; ``noise``: the draws, else drawn here). Returns
        (latents, log q [k, B], means per layer)."""
        h, previous, log_q = x, None, 0.0
        latents: list[Tensor] = []
        means: list[Tensor] = []
        for i, encoder in enumerate(self.encoders):
            mean, logvar = _mean_logvar(encoder(h))  # layer 0: [B, d] (once per data point); else [k, B, d]
            eps = noise[i] if noise is not None else torch.randn((k, *mean.shape[-2:]), device=mean.device,
                                                                  dtype=mean.dtype, generator=generator)
            z = mean + torch.exp(0.5 * logvar) * eps
            # The gradient of log w with respect to z_i enters through this alias only; z itself also
            # feeds the next encoder (the reparameterisation path), which DReG must not rescale.
            z_in_log_w = z.view_as(z)
            if stop_q and i == 0:
                mean_q, logvar_q = mean.detach(), logvar.detach()
            elif stop_q:
                # q's weights stopped, but the dependence of the density on z_{i-1} kept.
                mean_q, logvar_q = _mean_logvar(encoder(previous, frozen=True))
            else:
                mean_q, logvar_q = mean, logvar
            log_q = log_q + gaussian_log_density(z_in_log_w, mean_q, logvar_q)
            latents.append(z_in_log_w)
            means.append(mean)
            h, previous = z, z_in_log_w
        return latents, log_q, means

    def log_joint(self, x: Tensor, latents: list[Tensor]) -> Tensor:
        """log p(x, z_1..z_L), shape [k, B]."""
        log_p = standard_normal_log_density(latents[-1])
        for i in range(len(latents) - 1, 0, -1):
            mean, logvar = _mean_logvar(self.decoders[i](latents[i]))
            log_p = log_p + gaussian_log_density(latents[i - 1], mean, logvar)
        decoder = self.decoders[0]
        if self.fused_output_loglik is not None:
            out = decoder.layers[-1]
            return log_p + self.fused_output_loglik(decoder.hidden(latents[0]), out.weight, out.bias, x)
        logits = _full(decoder(latents[0]))
        return log_p + bernoulli_log_likelihood(x, logits)

    def forward(self, x: Tensor, k: int, stop_q: bool = False, generator: torch.Generator | None = None,
                noise: list[Tensor] | None = None) -> dict[str, Tensor | tuple[Tensor, ...]]:
        latents, log_q, _ = self.encode(x, k, stop_q, generator, noise)
        return {"log_w": self.log_joint(x, latents) - log_q, "latents": tuple(latents)}

    @torch.no_grad()
    def posterior_means(self, x: Tensor, samples: int = 100, generator: torch.Generator | None = None) -> list[Tensor]:
        """E_q[z_i | x] per layer, [B, d_i]: exact for the first layer; for deeper layers
        E_q(z_{i-1}|x)[mean_i(z_{i-1})], averaged over ``samples`` draws."""
        _, _, means = self.encode(x, samples, generator=generator)
        return [means[0]] + [m.mean(0) for m in means[1:]]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Pixel probabilities of ``n`` ancestral samples from the prior, [n, x_dim]."""
        device = self.decoders[0].layers[0].weight.device
        z = torch.randn(n, self.latent_dims[-1], device=device, generator=generator)
        for i in range(len(self.latent_dims) - 1, 0, -1):
            mean, logvar = _mean_logvar(self.decoders[i](z))
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=device, generator=generator)
        return torch.sigmoid(_full(self.decoders[0](z)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities decoded from the chain of posterior means."""
        h = x
        for encoder in self.encoders:
            h = _mean_logvar(encoder(h))[0]
        for i in range(len(self.latent_dims) - 1, 0, -1):
            h = _mean_logvar(self.decoders[i](h))[0]
        return torch.sigmoid(_full(self.decoders[0](h)))
