"""FD-SSM trains a model that autograd cannot differentiate twice; SSM cannot.

The energy uses fused attention (the CPU flash kernel of ``scaled_dot_product_attention``, whose
backward has no derivative): sliced score matching needs grad-of-grad and fails with a message that
points to the FD loss, while ``fd_ssm_loss`` needs only forward evaluations and trains it. Run:

    python docs/examples/no_double_backward.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fdsm_ext


class AttentionEnergy(nn.Module):
    """Log-density of a set of 4 tokens in R^2 (a flattened 8-vector) through one attention layer."""

    def __init__(self, tokens=4, dim=2, width=32):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.embed = nn.Linear(dim, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Sequential(nn.Softplus(), nn.Linear(width, 1))

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.dim))
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return self.out(a).sum((1, 2)) - 0.5 * x.square().sum(-1)


def main(steps=200, seed=0):
    torch.manual_seed(seed)
    model = AttentionEnergy()
    data = torch.randn(512, 8) * 0.5 + torch.linspace(-1, 1, 8)
    try:
        fdsm_ext.ssm_loss(model, data[:64]).backward()
        print("ssm_loss: trained (unexpected: this torch has a double backward for CPU flash attention)")
    except RuntimeError as exc:
        print(f"ssm_loss fails: {str(exc).splitlines()[0][:160]}...")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (64,))]
        loss = fdsm_ext.fd_ssm_loss(model, batch, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"fd_ssm_loss step {step:4d}: {loss.item():9.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
