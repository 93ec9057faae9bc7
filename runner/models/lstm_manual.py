"""An LSTM whose backward pass is written out, a drop-in for ``nn.LSTM(batch_first=True)``.

One layer is a ``torch.autograd.Function`` over the whole sequence. The forward pass computes
``x @ W_ih^T`` for all timesteps in one matmul, then runs the recurrence and saves the gate
activations and cell states; the backward pass runs the time loop in reverse with the classic
derivation (Graves 2013; Karpathy's min-char-rnn / char-rnn)::

    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
    c_t = f * c_{t-1} + i * g          h_t = o * tanh(c_t)

    dh_t  = dL/dh_t (from the output) + dh from step t+1
    do    = dh_t * tanh(c_t)                        dc_t += dh_t * o * (1 - tanh(c_t)^2)
    di    = dc_t * g     df = dc_t * c_{t-1}        dg = dc_t * i        dc_{t-1} = dc_t * f
    dgates (pre-activation) = [di*i(1-i), df*f(1-f), dg*(1-g^2), do*o(1-o)]
    dh_{t-1} = dgates W_hh;   then, over all steps at once:
    dW_ih = dgates^T x,  dW_hh = dgates^T h_{t-1},  db = sum dgates,  dx = dgates W_ih

Parameters use nn.LSTM's names, layout, gate order (i, f, g, o) and initialisation, so a
state_dict moves between the two implementations unchanged and the same seed gives the same
weights.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer over a whole batch-first sequence: returns (h_1..h_T, c_T), and the gate
    activations and cell states that backward reads (outputs, not differentiable, so that
    ``torch.func.vmap`` can batch the function over jobs: ``generate_vmap_rule``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                b_ih: Tensor, b_hh: Tensor) -> tuple[Tensor, ...]:
        batch, steps, _ = x.shape
        hidden = w_hh.shape[1]
        # Input contributions of every timestep in one matmul; only h @ W_hh stays in the loop.
        x_gates = torch.addmm(b_ih + b_hh, x.reshape(batch * steps, -1), w_ih.t()).view(batch, steps, 4 * hidden)
        gates, cells, tanh_cells, hs = [], [c0], [], []  # per step: activations i, f, g, o; c_0..c_T
        h = h0
        for t in range(steps):
            pre = torch.addmm(x_gates[:, t], h, w_hh.t())
            i, f, g, o = pre.chunk(4, dim=1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = torch.addcmul(f * cells[t], i, g)
            tc = torch.tanh(c)
            h = o * tc
            gates.append(torch.cat((i, f, g, o), dim=1))
            cells.append(c)
            tanh_cells.append(tc)
            hs.append(h)
        return (torch.stack(hs, dim=1), cells[steps], torch.stack(gates, dim=1),
                torch.stack(cells, dim=1), torch.stack(tanh_cells, dim=1))

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:
        x, h0, _, w_ih, w_hh, _, _ = inputs
        hs, _, gates, cells, tanh_cells = output
        ctx.mark_non_differentiable(gates, cells, tanh_cells)
        ctx.save_for_backward(x, h0, w_ih, w_hh, gates, cells, tanh_cells, hs)

    @staticmethod
    def backward(ctx, d_hs: Tensor | None, d_c_last: Tensor | None, *_: Tensor):
        x, h0, w_ih, w_hh, gates, cells, tanh_cells, hs = ctx.saved_tensors
        batch, steps, _ = x.shape
        hidden = w_hh.shape[1]
        if d_hs is None:
            d_hs = torch.zeros_like(hs)
        d_gates = [None] * steps  # pre-activation gradients, per step
        dh_next = torch.zeros_like(h0)
        dc = d_c_last.clone() if d_c_last is not None else torch.zeros_like(h0)
        for t in reversed(range(steps)):
            i, f, g, o = gates[:, t].chunk(4, dim=1)
            tc = tanh_cells[:, t]
            dh = d_hs[:, t] + dh_next
            dc = dc + dh * o * (1 - tc * tc)
            d_gates[t] = torch.cat((
                dc * g * i * (1 - i),
                dc * cells[:, t] * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tc * o * (1 - o),
            ), dim=1)
            dh_next = d_gates[t] @ w_hh
            dc = dc * f
        flat = torch.stack(d_gates, dim=1).reshape(batch * steps, 4 * hidden)
        h_prev = torch.cat((h0.unsqueeze(1), hs[:, :-1]), dim=1).reshape(batch * steps, hidden)
        need = ctx.needs_input_grad
        dx = (flat @ w_ih).view_as(x) if need[0] else None
        dw_ih = flat.t() @ x.reshape(batch * steps, -1) if need[3] else None
        dw_hh = flat.t() @ h_prev if need[4] else None
        db = flat.sum(0) if (need[5] or need[6]) else None
        return dx, dh_next if need[1] else None, dc if need[2] else None, dw_ih, dw_hh, \
            db if need[5] else None, db if need[6] else None


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
               b_hh: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs [B, T, H], c_T [B, H]) of one layer; h_T is ``outputs[:, -1]``."""
    hs, c_last, *_ = LSTMLayerFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return hs, c_last


class ManualLSTM(nn.Module):
    """Stacked layers of ``LSTMLayerFunction``; same call and state shapes as
    ``nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        # Registered in nn.LSTM's order so reset_parameters draws the same numbers from the RNG.
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, in_size)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            state = (zeros, zeros)
        h0, c0 = state
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            x, c_last = lstm_layer(
                x, h0[layer], c0[layer],
                getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}"),
                getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}"),
            )
            last_h.append(x[:, -1])
            last_c.append(c_last)
        return x, (torch.stack(last_h), torch.stack(last_c))
