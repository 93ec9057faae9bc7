"""The floors of benchmarks/README.md: FLOPs (forward + backward, counted by PyTorch's
FlopCounterMode) and the fewest bytes a training step must move (every activation written in
the forward pass and read in the backward pass, and its gradient written and read: 4 x the
activation bytes, in the step's dtype). Runs on the CPU; the ceilings come from the GPU run."""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")


def count(model: nn.Module, run) -> tuple[float, float]:
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() if torch.is_tensor(o) else 0))
             for m in model.modules() if len(list(m.children())) == 0]
    with FlopCounterMode(display=False) as counter:
        run().backward()
    for h in hooks:
        h.remove()
    return counter.get_total_flops(), float(sum(sizes))


def main() -> None:
    from runner.models.torchvision_models import build as torchvision_model
    from runner.models.vae import VAE
    from runner.losses.iwae import IWAE
    from runner.models.char_lstm import CharLSTM

    rows = []
    net = torchvision_model("densenet121", num_outputs=4)
    x = torch.randn(1, 3, 224, 224)
    flops, acts = count(net, lambda: net(x).sum())
    rows.append(("DenseNet121 224px, per image", flops, 4 * acts * 2))  # bf16 activations
    vae, bound = VAE(x_dim=784, latent_dims=[50], hidden_dims=[[200, 200]]), IWAE(k=50)
    xb = torch.bernoulli(torch.rand(20, 784))
    flops, acts = count(vae, lambda: bound(vae(xb, 50)).sum())
    params = sum(p.numel() for p in vae.parameters())
    # Adam reads and writes weights, grads and two moments: 16 bytes per parameter read + written.
    rows.append(("IWAE k=50 batch 20, per step", flops, 4 * acts * 4 + 2 * 16 * params))
    lm = CharLSTM(vocab_size=65)
    ids = torch.randint(0, 65, (50, 50))
    flops, acts = count(lm, lambda: lm(ids)[0].sum())
    rows.append(("char-LSTM 2x128, 50x50 tokens, per step", flops, 4 * acts * 4))
    print(f"{'case':<40} {'GFLOP':>10} {'MB moved':>10}")
    for name, f, b in rows:
        print(f"{name:<40} {f / 1e9:>10.3f} {b / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
