"""A smooth MLP log-density for low-dimensional data."""

from __future__ import annotations

from torch import Tensor, nn


class MLPLogDensity(nn.Module):
    """``f(x) = MLP(x)``: unnormalized log-density ``(N, dim) -> (N,)`` (the energy is ``-f``).

    Softplus activations keep ``f`` twice differentiable (the gradient-based losses need the Hessian
    trace; ReLU's would vanish).

    Args:
        dim: input dimension.
        hidden: width of each hidden layer.
        depth: number of hidden layers.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        layers, width = [], dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Softplus()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)
