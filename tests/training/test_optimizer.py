"""The trainer's fused Adam against torch's plain Adam, step for step, on every architecture."""

from pathlib import Path

import pytest
import torch

from e2edict.saes import registry

ROOT = Path(__file__).resolve().parents[2]

@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "gated"])
def test_fused_adam_steps_equal_the_plain_adam_steps(arch):
    """torch's fused CPU Adam treats a parameter, its gradient and its state as flat memory (a
    strided parameter is slow, and wrong once its state is restored contiguous). Every parameter
    and gradient is contiguous, and the trainer's optimizer takes the same steps as plain Adam."""
    from e2edict.optim import make_optimizer

    kw = {"topk": {"k": 4}, "jumprelu": {"init_threshold": 0.1}}.get(arch, {})
    torch.manual_seed(0)
    saes = [registry[arch](16, 512, **kw) for _ in range(2)]
    saes[1].load_state_dict(saes[0].state_dict())
    if arch == "relu":
        for s in saes:
            with torch.no_grad():
                s.b_enc.sub_(1.5)
    opts = [make_optimizer(list(saes[0].parameters()), 1e-2), torch.optim.Adam(saes[1].parameters(), lr=1e-2, foreach=False)]
    x = torch.randn(6, 16)
    for _ in range(3):
        for s, o in zip(saes, opts, strict=True):
            a, c = s(x)
            ((a - x).square().mean() + s.sparsity_loss(x, c, 1.0)).backward()
            assert all(p.is_contiguous() and p.grad.is_contiguous() for p in s.parameters() if p.grad is not None)
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, p), q in zip(saes[0].named_parameters(), saes[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
