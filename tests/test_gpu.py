"""GPU-only checks (skipped on machines without CUDA; run on the lent GPU machine):
the whole step captured in a CUDA graph computes the same training as the eager loop."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import compose, rejected, relative_difference, run_cli, run_in_process

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]


def relative_weight_difference(run_dir, reference_dir) -> float:
    """||w - w_ref|| / ||w_ref|| over all final weights of two runs."""
    return relative_difference(weights(run_dir), weights(reference_dir))


# IWAE k=50 on the silhouettes, captured with 5 steps per launch, fp32, 40 steps: the settings of
# the tests that compare a faster path (fused, compiled) with the plain captured step.
IWAE_CAPTURED = ("experiment=iwae_silhouettes", "device=gpu", "trainer.progress=none", "trainer.batch_size=20",
                 "loss.k=50", "loss.eval_k=100", "trainer.max_epochs=2", "trainer.max_steps=40",
                 "trainer.cuda_graph=true", "trainer.data_on_device=true", "trainer.steps_per_graph=5")


def two_runs(tmp_path, common, changed):
    """Run ``common`` and ``common + changed``; both run folders."""
    code, first = run_in_process(tmp_path / "first", *common)
    assert code == 0
    code, second = run_in_process(tmp_path / "second", *common, *changed)
    assert code == 0
    return first, second


def same_training(tmp_path, common, changed, rtol, atol):
    """Run ``common`` and ``common + changed``; assert the final weights agree; return both run folders."""
    first, second = two_runs(tmp_path, common, changed)
    a, b = weights(first), weights(second)
    for name in a:
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=rtol, atol=atol)
    return first, second


def test_cuda_graph_step_equals_eager_step(tmp_path):
    # 250 samples at batch 16: 15 captured steps and an odd last batch run eagerly, each epoch.
    common = ("experiment=regression", "device=gpu", "trainer.progress=none", "optim=adam", "optim.lr=0.01",
              "dataset.n_train=250", "trainer.max_epochs=3", "trainer.gradient_clip_val=1.0")
    _, graph = same_training(tmp_path, common, ("trainer.cuda_graph=true", "trainer.data_on_device=true"),
                             rtol=1e-4, atol=1e-5)
    s = json.loads((graph / "summary.json").read_text())
    assert s["steps"] == 3 * 16 and s["samples_seen"] == 750


def test_cuda_graph_iwae_trains(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=iwae_silhouettes", "device=gpu", "trainer.progress=none",
                                   "trainer.batch_size=20", "loss.k=50", "trainer.max_epochs=2", "loss.eval_k=100",
                                   "trainer.cuda_graph=true", "trainer.data_on_device=true")
    assert code == 0
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0] and all(map(lambda v: v == v, train))


def test_bf16_channels_last_densenet(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=focal_densenet", "device=gpu", "trainer.progress=none",
                                   "trainer.precision=bf16", "trainer.channels_last=true", "trainer.max_epochs=1")
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["test/mAP"] > 0.3


def test_cuda_graph_char_lstm_carries_state_like_eager(tmp_path):
    common = ("experiment=char_lstm", "device=gpu", "trainer.progress=none", "trainer.max_epochs=1",
              "trainer.max_steps=40", "trainer.log_every_n_steps=10", "model.sample_length=20")
    same_training(tmp_path, common, ("trainer.cuda_graph=true",), rtol=1e-3, atol=1e-4)


def test_iwae_paper_defaults_to_the_captured_step_on_a_gpu():
    t = compose("experiment=iwae_paper", "device=gpu").trainer
    assert t.cuda_graph is True and t.data_on_device is True and t.compile is True and t.steps_per_graph == 10
    assert t.compile_optimizer is True
    on_cpu = compose("experiment=iwae_paper", "device=cpu").trainer
    assert on_cpu.cuda_graph is False and on_cpu.compile_optimizer is False


def test_cuda_graph_densenet_with_batchnorm_trains_like_eager(tmp_path):
    # SGD, not Adam: Adam's first steps move every weight by about lr whatever the gradient's
    # size, so rounding noise from cuDNN's algorithm choice would show as lr-sized differences.
    common = ("experiment=focal_densenet", "device=gpu", "trainer.progress=none", "trainer.max_epochs=2",
              "dataset.n_train=256", "dataset.n_val=128", "dataset.n_test=128", "dataset.image_size=32",
              "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9", "trainer.deterministic=true")
    # The weights compared include BatchNorm's running statistics, updated inside the graph too.
    eager, graph = same_training(tmp_path, common, ("trainer.cuda_graph=true",), rtol=1e-3, atol=1e-4)
    assert any("running_mean" in name for name in weights(eager))
    a, b = (json.loads((d / "summary.json").read_text())["metrics"] for d in (eager, graph))
    assert b["test/loss"] == pytest.approx(a["test/loss"], rel=1e-3)


def test_jpegs_decoded_by_nvjpeg_match_the_cpu_decoder(tmp_path):
    """decode=device on the GPU (nvJPEG) against decode=cpu (libjpeg-turbo): the two decoders
    may round the inverse DCT and the chroma upsampling differently, by a few levels."""
    from test_multilabel_data import jpeg_and_png_folder, _batches_on

    from runner.data import multilabel_csv

    folder, csv = jpeg_and_png_folder(tmp_path, 9)
    on_cpu = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=32, decode="cpu")
    on_gpu = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=32, device=torch.device("cuda"))
    assert on_gpu.train.on_device  # decode=auto on a GPU
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    for (a, la), (b, lb) in zip(_batches_on(on_cpu.train, 4, torch.device("cuda")),
                                _batches_on(on_gpu.train, 4, torch.device("cuda"))):
        assert b.device.type == "cuda" and torch.equal(la, lb)
        levels = ((b - a).abs().cpu() * std)  # differences in 8-bit levels
        assert levels.mean() < 1.5 and levels.max() < 24


def test_captured_step_fed_by_a_dataloader_with_workers(tmp_path):
    """The pin-memory thread runs while the step is captured (capture_error_mode=thread_local)."""
    code, run_dir = run_in_process(tmp_path, "experiment=focal_densenet", "device=gpu", "trainer.progress=none",
                                   "trainer.max_epochs=1", "dataset.n_train=512", "dataset.n_val=64",
                                   "dataset.n_test=64", "trainer.cuda_graph=true", "trainer.num_workers=2")
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_captured_step_reports_a_non_finite_loss(tmp_path):
    """Inside the graph nothing is read on the host: the NaN shows in the running loss at the
    next logging point, and the run fails there with the step named."""
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "device=gpu", "trainer.progress=none",
                                   "optim=sgd", "optim.lr=1e12", "trainer.cuda_graph=true",
                                   "trainer.data_on_device=true", "trainer.log_every_n_steps=5")
    assert code == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite training loss" in summary["error"]
    assert summary["steps"] <= 5


def test_several_steps_per_graph_launch_train_like_one(tmp_path):
    """trainer.steps_per_graph=4: the same steps in the same order as one per launch (the lr
    drops at each epoch: launches never straddle it; partial chunks run one step at a time)."""
    common = ("experiment=regression", "device=gpu", "trainer.progress=none", "optim=adam", "optim.lr=0.01",
              "dataset.n_train=250", "trainer.max_epochs=3", "schedule=step", "trainer.cuda_graph=true",
              "trainer.data_on_device=true", "trainer.log_every_n_steps=5")
    one, four = same_training(tmp_path, common, ("trainer.steps_per_graph=4",), rtol=1e-6, atol=1e-7)
    s1, s4 = (json.loads((d / "summary.json").read_text()) for d in (one, four))
    assert s4["steps"] == s1["steps"] == 48 and s4["samples_seen"] == 750
    assert s4["metrics"]["test/loss"] == pytest.approx(s1["metrics"]["test/loss"], rel=1e-6)


def test_captured_step_follows_any_optimizer_and_per_step_schedule(tmp_path):
    """RAdam (capturable) under a per-step cosine schedule: the captured step reads the lr tensor
    the schedule fills in place, so it trains like the eager loop."""
    common = ("experiment=regression", "device=gpu", "trainer.progress=none", "optim._target_=torch.optim.RAdam",
              "~optim.momentum", "~optim.nesterov", "optim.lr=0.01", "schedule=cosine", "schedule.warmup_steps=5",
              "dataset.n_train=256", "trainer.max_epochs=3", "trainer.log_every_n_steps=4")
    # RAdam's capturable step computes its rectification on the device, the eager one on the host:
    # the two agree to rounding, not bit for bit.
    eager, graph = same_training(tmp_path, common, ("trainer.cuda_graph=true", "trainer.data_on_device=true"),
                                 rtol=1e-3, atol=1e-4)
    lrs = [[json.loads(l)["lr"] for l in (d / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == "train"] for d in (eager, graph)]
    assert lrs[0] == pytest.approx(lrs[1]) and lrs[0][-1] < 1e-4  # annealed to eta_min=0 by the end


def test_captured_one_cycle_without_momentum_cycling_runs(tmp_path):
    code, run_dir = run_in_process(tmp_path, "experiment=regression", "device=gpu", "trainer.progress=none",
                                   "optim=sgd", "schedule=one_cycle", "schedule.cycle_momentum=false",
                                   "trainer.cuda_graph=true", "trainer.data_on_device=true")
    assert code == 0
    refused, error = rejected(tmp_path / "refused", "experiment=regression", "device=gpu",
                              "trainer.progress=none", "optim=sgd", "schedule=one_cycle",
                              "trainer.cuda_graph=true", "trainer.data_on_device=true")
    assert refused == 2 and "cycle_momentum=false" in error


def test_fused_captured_iwae_jobs_equal_their_captured_runs_alone(tmp_path):
    """hydra/launcher=fused on a GPU: graph-captured steps, several per launch, each job drawing
    from its own CUDA generator (registered with the graph), in fp32: each job as alone."""
    done = run_cli("-m", "hydra/launcher=fused", *IWAE_CAPTURED, "trainer.seed=0,1", "loss=iwae",
                   f"output_root={tmp_path / 'fused'}")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "fused" / "multirun").iterdir()
    assert "fused group of 2 jobs" in (sweep / "0" / "run.log").read_text()
    for seed in (0, 1):
        code, alone = run_in_process(tmp_path / f"alone{seed}", *IWAE_CAPTURED, f"trainer.seed={seed}")
        assert code == 0
        fused = torch.load(sweep / str(seed) / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        ref = torch.load(alone / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        assert fused["loop"]["step"] == ref["loop"]["step"] == 40
        assert torch.equal(fused["rng"]["cuda"][0], ref["rng"]["cuda"][0])  # the same draws, in the same number
        # Batched and single cuBLAS kernels round differently and IWAE amplifies it step by step
        # (on the CPU as much as a 1-ulp change of every weight of the run alone): 1.3e-5 measured
        # on an H200 at 40 steps. A wrong stream or gradient division differs by far more.
        assert relative_difference(fused["model"], ref["model"]) <= 1e-4


def test_compiled_optimizer_in_a_captured_step_trains_like_fused_adam(tmp_path):
    """trainer.compile_optimizer=true: capturable foreach Adam compiled, inside the CUDA graph,
    against fused Adam's kernel (the default captured step), fp32, 40 steps of IWAE."""
    # Two implementations of Adam (fused CUDA kernel, generated kernels) round differently from the
    # first step, and IWAE's training amplifies rounding (tests/test_fused.py): elementwise, 25 of
    # 156,800 weights were 7.5e-5 apart after 40 steps on an H200. The weights as a whole, as the
    # fused tests compare them.
    first, second = two_runs(tmp_path, IWAE_CAPTURED, ("trainer.compile_optimizer=true",))
    assert relative_weight_difference(second, first) <= 1e-4


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_a_compiled_captured_step_trains_like_the_uncompiled_one(tmp_path, mode):
    """trainer.compile=true compiles the model and its loss as one function, inside the CUDA graph
    (with max-autotune-no-cudagraphs, Triton's matrix products too); fp32, 40 steps, the weights as
    a whole (rounding, as above). (loss=dreg stays eager: its gradient hook failed Inductor here.)"""
    first, second = two_runs(tmp_path, (*IWAE_CAPTURED, "loss=iwae"),
                             ("trainer.compile=true", f"trainer.compile_mode={mode}"))
    assert relative_weight_difference(second, first) <= 1e-4


def test_fused_group_with_a_compiled_optimizer_equals_its_jobs_alone(tmp_path):
    """The group steps every job's optimizer in one compiled call; each job as alone with the same setting."""
    common = (*IWAE_CAPTURED, "trainer.compile_optimizer=true")
    done = run_cli("-m", "hydra/launcher=fused", *common, "trainer.seed=0,1", f"output_root={tmp_path / 'fused'}")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "fused" / "multirun").iterdir()
    code, alone = run_in_process(tmp_path / "alone", *common, "trainer.seed=1")
    assert code == 0
    assert relative_weight_difference(sweep / "1", alone) <= 1e-4  # the bound of the fused test above, same reason


def _output_problem(jobs, k=50, batch=20, hidden=200, pixels=784, seed=0):
    """A fused group's decoder output layer at the paper's sizes: h [J, k, B, H], W, b, x (0/1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.tanh(torch.randn(jobs, k, batch, hidden, generator=g))
    weight = torch.randn(jobs, pixels, hidden, generator=g) / hidden ** 0.5
    bias = torch.randn(jobs, pixels, generator=g)
    x = torch.bernoulli(torch.full((jobs, batch, pixels), 0.3), generator=g)
    return [t.cuda().requires_grad_(i < 3) for i, t in enumerate((h, weight, bias, x))]


def test_fused_output_op_matches_eager_on_cuda_in_fp32_tf32_and_a_cuda_graph():
    """model.fused_output's Triton kernels (runner/models/vae_kernels.py) on the GPU, six jobs
    under vmap: (1) full fp32 against the eager reference, to summation order; (2) with TF32 no
    farther from a float64 reference than cuBLAS's TF32 products are; (3) forward and backward
    captured in a CUDA graph and replayed on new inputs."""
    from torch.func import vmap

    from runner.models import vae_kernels as vk

    fused, eager = vmap(vk.output_loglik), vmap(vk.output_loglik_reference)

    def value_and_grads(fn, args):
        out = fn(*args)
        g = torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)
        return [out.detach(), *torch.autograd.grad(out, args[:3], g)]

    args = _output_problem(6)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for a, b in zip(value_and_grads(fused, args), value_and_grads(eager, args)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        exact = value_and_grads(eager, [t.double().requires_grad_(t.requires_grad) for t in args])
        torch.backends.cuda.matmul.allow_tf32 = True
        for a, b, ref in zip(value_and_grads(fused, args), value_and_grads(eager, args), exact):
            # Both round the products' inputs to TF32's 10 bits; Triton and cuBLAS may round them
            # differently (and sum in another order): within 3x of cuBLAS's error, not equal to it.
            assert (a.double() - ref).norm() <= 3 * (b.double() - ref).norm() + 1e-6 * ref.norm()
        torch.backends.cuda.matmul.allow_tf32 = False
        static = [t.detach().clone().requires_grad_(t.requires_grad) for t in args]
        side = torch.cuda.Stream()  # warm-up on a side stream, as before any capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            value_and_grads(fused, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = value_and_grads(fused, static)
        fresh = _output_problem(6, seed=1)
        with torch.no_grad():
            for s, f in zip(static, fresh):
                s.copy_(f)
        graph.replay()
        for a, b in zip(captured, value_and_grads(eager, fresh)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_output_trains_like_the_eager_model_alone_and_in_a_fused_group(tmp_path, compiled, caplog):
    """model.fused_output=true in the captured step (5 steps per launch, fp32; with
    trainer.compile=true the op is opaque to Inductor), alone and in a fused group of two: the
    weights of the eager model's runs, as a whole (the paths round differently: the bound of the
    compiled and fused tests above)."""
    from runner.models import vae_kernels

    common = (*IWAE_CAPTURED, "loss=iwae", f"trainer.compile={str(compiled).lower()}")
    vae_kernels._announced.clear()  # said once per process: this run must say it again
    with caplog.at_level(logging.INFO, logger="runner.models.vae_kernels"):
        eager, fused_output = two_runs(tmp_path, common, ("model.fused_output=true",))
    assert "model.fused_output: Triton kernels on the GPU, 1 job(s) per launch" in caplog.text
    assert relative_weight_difference(fused_output, eager) <= 1e-4
    done = run_cli("-m", "hydra/launcher=fused", *common, "model.fused_output=true", "trainer.seed=0,1",
                   f"output_root={tmp_path / 'fused'}")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "fused" / "multirun").iterdir()
    assert "Triton kernels on the GPU, 2 job(s) per launch" in (sweep / "0" / "run.log").read_text()
    assert relative_weight_difference(sweep / "0", eager) <= 1e-4  # IWAE_CAPTURED runs seed 0 by default


def test_group_signals_at_random_moments_always_leave_a_true_summary(tmp_path):
    """SIGTERM to the whole process group (as timeout, a terminal's Ctrl-C and SLURM send it; the
    group holds torch.compile's workers too) at random moments of an iwae_paper-like run with
    compile, captured steps and epoch-end checkpoints: every time the run ends interrupted (or
    completed), summary.json says so, never 'running', and a run that trained has its last.pt.
    RUNNER_STRESS_SIGNALS sets how many (20 by default); the seed of each moment is printed."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    tries = int(os.environ.get("RUNNER_STRESS_SIGNALS", "20"))
    outcomes = []
    for seed in range(tries):
        delay = random.Random(seed).uniform(2.0, 40.0)
        out = tmp_path / f"try{seed}"
        proc = subprocess.Popen([sys.executable, "-m", "runner", "experiment=iwae_silhouettes", "device=gpu",
                                 "trainer.progress=plain", "trainer.cuda_graph=true", "trainer.data_on_device=true",
                                 "trainer.compile=true", "trainer.compile_optimizer=true", "trainer.precision=tf32",
                                 "trainer.steps_per_graph=10", "trainer.batch_size=20", "loss.k=50", "loss.eval_k=100",
                                 "trainer.max_epochs=400", f"output_root={out}"], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        (run,) = (out / "runs").iterdir() if (out / "runs").is_dir() else (None,)
        summary = json.loads((run / "summary.json").read_text()) if run and (run / "summary.json").is_file() else {}
        outcomes.append((seed, round(delay, 1), proc.returncode, summary.get("status"), summary.get("steps"),
                         bool(run and (run / "checkpoints" / "last.pt").is_file())))
        print(outcomes[-1], flush=True)
        assert proc.returncode in (0, 143), (outcomes[-1], output[-3000:])
        if summary:  # none: the signal came before the run folder had a summary (nothing to be wrong)
            assert summary["status"] in ("interrupted", "completed"), (outcomes[-1], output[-3000:])
            assert summary["steps"] == 0 or outcomes[-1][-1], (outcomes[-1], output[-3000:])
