"""The fused decoder output layer + Bernoulli log-likelihood (runner/models/vae_kernels.py),
checked against the eager model's computation, float64 finite differences and a per-job loop.
Collected through tests/test_vae_kernels.py, which runs this file in a process of its own.

Without a GPU the Triton kernels run under Triton's interpreter (NumPy on the CPU): Triton
decides when a kernel is decorated, so TRITON_INTERPRET=1 is set while the module is imported,
and again during each test here (the interpreter reads it as it runs). The interpreter cannot
run once torch.compile has run in the process ("Cannot call @triton.jit'd outside of the scope
of a kernel"), hence the process of its own. With a GPU the same tests run the compiled kernels.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.func import functional_call, vmap

from conftest import relative_difference, run_cli, run_in_process

_switched = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _switched:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import runner.models.vae_kernels as vk
finally:
    if _switched:
        del os.environ["TRITON_INTERPRET"]

from runner.models.vae import VAE

if vk.triton is None:
    pytestmark = pytest.mark.skip(reason="triton is not installed")
elif not vk.INTERPRETED and not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="runner.models.vae_kernels was imported before TRITON_INTERPRET=1 was set "
                                         "and there is no GPU: run this file in a process of its own")
DEVICE = torch.device("cpu" if vk.INTERPRETED else "cuda")
# fp32 against fp32, both with full-precision products (TF32 off): they differ only in summation
# order. A log-likelihood sums P terms of size |l| ~ 10, so its rounding is ~ sqrt(P) * 10 * 6e-8
# ~ 2e-5 absolute; gradients sum N or P products of O(1) terms, a few ulps of their sum.
LOGLIK = dict(rtol=1e-5, atol=1e-4)
GRAD = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def interpreter_and_full_precision(monkeypatch):
    """The interpreter's switch for this test; products in full precision (TF32 off) on a GPU."""
    if vk.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def problem(k, batch, hidden, pixels, jobs=None, scale=1.0, dtype=torch.float32, seed=0):
    """h [(jobs,) k, B, H], W [(jobs,) P, H], b [(jobs,) P], x [(jobs,) B, P] (0/1), gradient-ready."""
    g = torch.Generator().manual_seed(seed)
    lead = () if jobs is None else (jobs,)
    h = torch.tanh(torch.randn(*lead, k, batch, hidden, generator=g, dtype=dtype))
    weight = torch.randn(*lead, pixels, hidden, generator=g, dtype=dtype) * scale / math.sqrt(hidden)
    bias = torch.randn(*lead, pixels, generator=g, dtype=dtype) * scale
    x = torch.bernoulli(torch.full((*lead, batch, pixels), 0.3, dtype=dtype), generator=g)
    return [t.to(DEVICE).requires_grad_(i < 3) for i, t in enumerate((h, weight, bias, x))]


def value_and_grads(fn, h, weight, bias, x, seed=1):
    """fn's value and the gradients of <out, g> for a fixed random g (every row weighted differently)."""
    out = fn(h, weight, bias, x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return out, torch.autograd.grad(out, (h, weight, bias), g)


class Launches:
    """A Triton kernel with its launches recorded (the grid of each)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    recorded = {}
    for name in ("_forward_kernel", "_dh_kernel", "_dw_kernel"):
        recorded[name] = Launches(getattr(vk, name))
        monkeypatch.setattr(vk, name, recorded[name])
    return recorded


# Sizes that leave partial tiles everywhere (rows, pixels, hidden not a power of two), and the paper's.
@pytest.mark.parametrize("k,batch,hidden,pixels", [(3, 5, 20, 37), (2, 3, 200, 784)])
def test_values_and_gradients_equal_the_eager_reference(k, batch, hidden, pixels, launches):
    h, weight, bias, x = problem(k, batch, hidden, pixels)
    fused, fused_grads = value_and_grads(vk.output_loglik, h, weight, bias, x)
    eager, eager_grads = value_and_grads(vk.output_loglik_reference, h, weight, bias, x)
    assert len(launches["_forward_kernel"].grids) == 1 and len(launches["_dw_kernel"].grids) == 1  # the kernels ran
    assert fused.shape == (k, batch)
    torch.testing.assert_close(fused, eager, **LOGLIK)
    for name, a, b in zip(("dh", "dW", "db"), fused_grads, eager_grads):
        torch.testing.assert_close(a, b, **GRAD)


def test_saturated_logits_stay_finite_and_exact():
    """|logits| up to ~100: softplus and sigmoid from exp(-|l|), no overflow, no log(0)."""
    h, weight, bias, x = problem(2, 4, 16, 40, scale=60.0)
    fused, fused_grads = value_and_grads(vk.output_loglik, h, weight, bias, x)
    eager, eager_grads = value_and_grads(vk.output_loglik_reference, h, weight, bias, x)
    assert torch.isfinite(fused).all() and fused.abs().max() > 100
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-3)
    for a, b in zip(fused_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not vk.INTERPRETED, reason="float64 products are the interpreter's (NumPy); on a GPU the model "
                                               "sends float64 to the reference")
def test_float64_kernels_match_finite_differences():
    """The op itself in float64 (the public entry point sends float64 to the reference), with a
    jobs dimension and partial tiles: torch.autograd.gradcheck's central differences."""
    h, weight, bias, x = problem(3, 2, 5, 19, jobs=2, dtype=torch.float64)
    h, x = h.reshape(2, 6, 5).detach().requires_grad_(), x.detach()
    # fast_mode: the derivative along random directions, a few evaluations instead of one per element.
    assert torch.autograd.gradcheck(lambda h, w, b: vk.bernoulli_output_loglik(h, w, b, x), (h, weight, bias),
                                    fast_mode=True)


def test_vmap_over_jobs_is_one_launch_per_kernel_and_equals_a_loop_over_jobs(launches):
    jobs = 3
    h, weight, bias, x = problem(4, 5, 24, 50, jobs=jobs)
    batched, batched_grads = value_and_grads(vmap(vk.output_loglik), h, weight, bias, x)
    for name, kernel in launches.items():  # one launch each for all jobs, the jobs a grid dimension
        assert len(kernel.grids) == 1 and kernel.grids[0][1] == jobs, name
    looped, looped_grads = value_and_grads(
        lambda *args: torch.stack([vk.output_loglik(*(a[j] for a in args)) for j in range(jobs)]), h, weight, bias, x)
    eager, _ = value_and_grads(
        lambda *args: torch.stack([vk.output_loglik_reference(*(a[j] for a in args)) for j in range(jobs)]),
        h, weight, bias, x)
    assert len(launches["_forward_kernel"].grids) == 1 + jobs
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)  # the same tiles in the same order
    torch.testing.assert_close(batched, eager, **LOGLIK)
    for a, b in zip(batched_grads, looped_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vmap_with_weights_shared_by_the_jobs_sums_their_gradients():
    """in_dims=None for W and b: the vmap rule expands them (stride 0) and autograd adds the
    jobs' gradients through the expand."""
    jobs = 2
    h, _, _, x = problem(3, 4, 16, 33, jobs=jobs)
    _, weight, bias, _ = problem(3, 4, 16, 33, seed=5)
    shared = vmap(vk.output_loglik, in_dims=(0, None, None, 0))
    batched, batched_grads = value_and_grads(shared, h, weight, bias, x)
    eager, eager_grads = value_and_grads(
        lambda h, w, b, x: torch.stack([vk.output_loglik_reference(h[j], w, b, x[j]) for j in range(jobs)]),
        h, weight, bias, x)
    torch.testing.assert_close(batched, eager, **LOGLIK)
    for a, b in zip(batched_grads, eager_grads):
        torch.testing.assert_close(a, b, **GRAD)


def test_the_reference_runs_where_the_kernels_cannot(launches, monkeypatch):
    h, weight, bias, x = problem(2, 3, 8, 20, dtype=torch.float64)
    assert torch.equal(vk.output_loglik(h, weight, bias, x), vk.output_loglik_reference(h, weight, bias, x))
    h, weight, bias, x = problem(2, 3, 8, 20)
    monkeypatch.setattr(vk, "INTERPRETED", False)
    if DEVICE.type == "cpu":  # CPU tensors without the interpreter
        vk.output_loglik(h, weight, bias, x)
    wide = problem(2, 3, vk.MAX_HIDDEN + 1, 20)
    vk.output_loglik(*wide)
    autocast = [t.bfloat16() if i < 3 else t for i, t in enumerate(problem(2, 3, 8, 20))]  # autocast's dtype
    assert torch.equal(vk.output_loglik(*autocast), vk.output_loglik_reference(*autocast))
    assert all(not kernel.grids for kernel in launches.values())


def test_inputs_that_do_not_fit_are_refused_before_any_kernel_runs(launches):
    h, weight, bias, x = problem(2, 3, 8, 20)
    with pytest.raises(ValueError, match="do not fit"):  # x of 4 data points, h of 3
        vk.output_loglik(h, weight, bias, torch.cat([x, x[:1]]))
    assert not launches["_forward_kernel"].grids


@pytest.mark.parametrize("latent_dims,hidden_dims", [([50], [[200, 200]]), ([8, 4], [[30, 20], [10]])])
def test_a_vae_with_fused_output_computes_the_eager_vaes_log_weights_and_gradients(latent_dims, hidden_dims):
    """The whole model, both ways, from the same weights and draws. The gradients are those of a
    fixed random weighting of log w: a bound's softmax weights would amplify the paths' rounding
    (log w ~ -800 to 6e-5) into the gradients' comparison."""
    k, batch = 4, 3
    g = torch.Generator().manual_seed(7)
    x = torch.bernoulli(torch.full((batch, 784), 0.3), generator=g).to(DEVICE)
    noise = [torch.randn(k, batch, d, generator=g).to(DEVICE) for d in latent_dims]
    weighting = torch.randn(k, batch, generator=g).to(DEVICE)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = VAE(784, latent_dims, hidden_dims, train_mean=torch.rand(784), fused_output=fused).to(DEVICE)
        log_w = model(x, k, noise=noise)["log_w"]
        (weighting * log_w).sum().backward()
        results.append((log_w.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, eager, **LOGLIK)
    assert eager_grads.keys() == fused_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(fused_grads[name], eager_grads[name], **GRAD)


def test_fused_jobs_vmapped_over_stacked_weights_equal_each_eager_vae(launches):
    """The fused engine's mechanism (runner/engine/fused.py): every job's parameters stacked,
    vmap over functional_call of one model with model.fused_output: one launch per kernel for all
    jobs, and each job's log w and gradients those of its own eager model."""
    jobs, k, batch = 2, 2, 3
    g = torch.Generator().manual_seed(3)
    x = torch.bernoulli(torch.full((jobs, batch, 784), 0.3), generator=g).to(DEVICE)
    noise = [torch.randn(jobs, k, batch, 8, generator=g).to(DEVICE)]
    weighting = torch.randn(jobs, k, batch, generator=g).to(DEVICE)
    eager = []
    for seed in range(jobs):
        torch.manual_seed(seed)
        eager.append(VAE(784, [8], [[32, 16]], train_mean=torch.rand(784)).to(DEVICE))
    fused = VAE(784, [8], [[32, 16]], fused_output=True).to(DEVICE)
    stacked = {name: torch.stack([m.get_parameter(name).detach() for m in eager]).requires_grad_()
               for name, _ in fused.named_parameters()}

    def log_w(params, x, noise):
        return functional_call(fused, params, (x, k), {"noise": noise})["log_w"]

    batched = vmap(log_w)(stacked, x, noise)
    (weighting * batched).sum().backward()
    assert [len(kernel.grids) for kernel in launches.values()] == [1, 1, 1]
    assert all(kernel.grids[0][1] == jobs for kernel in launches.values())
    for j, model in enumerate(eager):
        alone = model(x[j], k, noise=[noise[0][j]])["log_w"]
        (weighting[j] * alone).sum().backward()
        torch.testing.assert_close(batched[j].detach(), alone.detach(), **LOGLIK)
        for name, p in model.named_parameters():
            torch.testing.assert_close(stacked[name].grad[j], p.grad, **GRAD)


def test_the_model_config_turns_it_on():
    from conftest import compose
    from runner.config.build import build

    cfg = compose("experiment=iwae_silhouettes", "model.fused_output=true")
    assert build(cfg.model, "model", x_dim=784).fused_output_loglik is vk.output_loglik
    assert build(compose("experiment=iwae_silhouettes").model, "model", x_dim=784).fused_output_loglik is None


# A narrow model (the kernels' sizes are the unit tests' business): the interpreter's tl.dot is slow.
IWAE = ["experiment=iwae_silhouettes", "device=cpu", "trainer.progress=none", "dataset.n_train=100",
        "dataset.n_val=0", "dataset.n_test=10", "trainer.batch_size=10", "loss=iwae", "loss.k=3", "loss.eval_k=3",
        "model.latent_dims=[8]", "model.hidden_dims=[[32,32]]", "trainer.max_epochs=1", "trainer.max_steps=5"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU engine; tests/test_gpu.py runs it on the GPU")
def test_a_fused_group_with_fused_output_trains_like_the_eager_run_alone(tmp_path):
    """Two jobs fused (vmap over the jobs, the op's vmap rule) with model.fused_output=true, in a
    subprocess that runs the kernels interpreted, against job 1 run alone with the eager model.
    ~30 s of CPU (start-up, and the interpreter's Python for every tile of 5 steps)."""
    done = run_cli("-m", "hydra/launcher=fused", *IWAE, "model.fused_output=true", "trainer.seed=0,1",
                   f"output_root={tmp_path / 'fused'}", env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "fused" / "multirun").iterdir()
    logged = (sweep / "0" / "run.log").read_text()
    assert "fused group of 2 jobs" in logged
    assert "model.fused_output: Triton kernels in Triton's interpreter, 2 job(s) per launch" in logged
    code, alone = run_in_process(tmp_path / "alone", *IWAE, "trainer.seed=1")
    assert code == 0
    fused, eager = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in (sweep / "1", alone))
    # 5 Adam steps; the eager and fused computations round differently (summation order), and
    # Adam's first steps move each weight by ~lr whatever the gradient's size: a few 1e-6 relative.
    assert relative_difference(fused, eager) <= 1e-5


@pytest.mark.slow
def test_torch_compile_treats_the_op_as_one_opaque_call_under_vmap():
    """A compiled vmap over jobs (the fused group's compiled step), gradients included, equals the
    uncompiled one. ~20 s: Inductor compiles C++ for the rest of the function on a CPU."""
    h, weight, bias, x = problem(3, 4, 24, 40, jobs=2)

    def bound(h, weight, bias, x):
        return torch.logsumexp(vk.output_loglik(torch.tanh(h), weight, bias, x), 0)

    compiled, compiled_grads = value_and_grads(torch.compile(vmap(bound)), h, weight, bias, x)
    eager, eager_grads = value_and_grads(vmap(bound), h, weight, bias, x)
    torch.testing.assert_close(compiled, eager, **LOGLIK)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, **GRAD)
