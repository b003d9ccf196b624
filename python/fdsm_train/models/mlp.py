"""A smooth MLP log-density for low-dimensional data."""

from __future__ import annotations

from torch import Tensor, nn


def softplus_mlp(dim_in: int, dim_out: int, hidden: int, n_linear: int) -> nn.Sequential:
    """``n_linear`` linear layers (``hidden`` wide inside) with softplus between them, none at the end.

    Softplus keeps the network twice differentiable (the gradient-based losses need the Hessian
    trace; ReLU's would vanish).
    """
    layers, width = [], dim_in
    for _ in range(n_linear - 1):
        layers += [nn.Linear(width, hidden), nn.Softplus()]
        width = hidden
    layers.append(nn.Linear(width, dim_out))
    return nn.Sequential(*layers)


class MLPLogDensity(nn.Module):
    """``f(x) = MLP(x)``: unnormalized log-density ``(N, dim) -> (N,)`` (the energy is ``-f``), a
    :func:`softplus_mlp`.

    Args:
        dim: input dimension.
        hidden: width of each hidden layer.
        depth: number of hidden layers.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.net = softplus_mlp(dim, 1, hidden, depth + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)
