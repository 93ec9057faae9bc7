"""The hand-written LSTM backward pass against autograd and nn.LSTM."""
from __future__ import annotations

import torch
from torch import nn

from runner.families.charlm import CharLMFamily
from runner.losses.charlm import TokenCrossEntropy
from runner.models.char_lstm import CharLSTM
from runner.models.lstm_manual import LSTMLayerFunction, ManualLSTM

F64 = torch.float64


def test_gradcheck_one_layer_multi_step_nonzero_state():
    g = torch.Generator().manual_seed(0)
    batch, steps, n_in, hidden = 2, 4, 3, 5

    def arg(*shape):
        return (torch.randn(*shape, generator=g, dtype=F64) * 0.7).requires_grad_()

    args = (arg(batch, steps, n_in), arg(batch, hidden), arg(batch, hidden), arg(4 * hidden, n_in),
            arg(4 * hidden, hidden), arg(4 * hidden), arg(4 * hidden))
    # Checks the Jacobians of both outputs (all h_t and c_T) with respect to every input.
    assert torch.autograd.gradcheck(LSTMLayerFunction.apply, args, eps=1e-6, atol=1e-7)


def _all_grads(lstm: nn.Module, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> dict[str, torch.Tensor]:
    x, h0, c0 = (t.clone().requires_grad_() for t in (x, h0, c0))
    out, (h, c) = lstm(x, (h0, c0))
    # A loss touching every output: all h_t, and the final h and c of each layer.
    weights = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
    loss = (weights * out).sum() + h.sin().sum() + (c * c).sum()
    loss.backward()
    grads = {name: p.grad for name, p in lstm.named_parameters()}
    return {"out": out.detach(), "h": h.detach(), "c": c.detach(), "dx": x.grad, "dh0": h0.grad, "dc0": c0.grad, **grads}


def test_grads_equal_nn_lstm_elementwise_float64():
    batch, steps, n_in, hidden, layers = 3, 7, 4, 6, 2
    torch.manual_seed(1)
    reference = nn.LSTM(n_in, hidden, layers, batch_first=True).to(F64)
    torch.manual_seed(1)
    manual = ManualLSTM(n_in, hidden, layers).to(F64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, steps, n_in, generator=g, dtype=F64)
    h0 = torch.randn(layers, batch, hidden, generator=g, dtype=F64)
    c0 = torch.randn(layers, batch, hidden, generator=g, dtype=F64)
    expected, got = _all_grads(reference, x, h0, c0), _all_grads(manual, x, h0, c0)
    assert expected.keys() == got.keys() and len(expected) == 6 + 4 * layers
    for name in expected:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-8, rtol=0, msg=name)


def test_same_layout_and_initialisation_as_nn_lstm():
    torch.manual_seed(3)
    reference = nn.LSTM(5, 8, 3, batch_first=True)
    torch.manual_seed(3)
    manual = ManualLSTM(5, 8, 3)
    ref_state, man_state = reference.state_dict(), manual.state_dict()
    assert list(ref_state) == list(man_state)
    for name in ref_state:
        assert torch.equal(ref_state[name], man_state[name]), name
    torch.manual_seed(4)
    torch_model = CharLSTM(vocab_size=11, impl="torch", embedding_dim=6, hidden_size=8)
    torch.manual_seed(4)
    manual_model = CharLSTM(vocab_size=11, impl="manual", embedding_dim=6, hidden_size=8)
    manual_model.load_state_dict(torch_model.state_dict())  # strict: same names and shapes
    assert all(torch.equal(a, b) for a, b in zip(torch_model.state_dict().values(), manual_model.state_dict().values()))


def _train_losses(impl: str, steps: int = 6) -> list[float]:
    torch.manual_seed(0)
    model = CharLSTM(vocab_size=13, impl=impl, embedding_dim=8, hidden_size=16, num_layers=2)
    family = CharLMFamily(model, TokenCrossEntropy(), vocab=[str(i) for i in range(13)])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = torch.randint(1, 13, (4, steps * 10 + 1), generator=torch.Generator().manual_seed(5))
    losses = []
    for t in range(steps):  # carried state across chunks, as in training
        loss_sum, count = family.train_loss((data[:, t * 10:(t + 1) * 10], data[:, t * 10 + 1:(t + 1) * 10 + 1]))
        optimizer.zero_grad()
        (loss_sum / count).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        losses.append(float(loss_sum.detach()) / count)
    return losses


def test_training_with_manual_impl_matches_torch_impl():
    torch_losses, manual_losses = _train_losses("torch"), _train_losses("manual")
    torch.testing.assert_close(torch.tensor(manual_losses), torch.tensor(torch_losses), atol=1e-5, rtol=1e-5)
    assert manual_losses[-1] < manual_losses[0]


def test_manual_impl_under_bf16_autocast_runs_in_float32():
    model = CharLSTM(vocab_size=7, impl="manual", embedding_dim=4, hidden_size=8)
    x = torch.randint(0, 7, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (h, c) = model(x, None)
        TokenCrossEntropy()(logits, x).backward()
    assert h.dtype == torch.float32 and c.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
