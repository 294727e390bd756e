import torch

from e3pruner.distributed import SINGLE
from e3pruner.recovery.distill import RecoveryConfig, adamw


def test_adamw_fused_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    shapes = [(37, 19), (5,), (64, 48)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    cfg = RecoveryConfig(lr=1e-2, weight_decay=0.1)
    fast = adamw(a, cfg, SINGLE)
    loop = torch.optim.AdamW(b, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                             foreach=False)
    assert fast.defaults.get("fused") or fast.defaults.get("foreach")
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for opt, ps in ((fast, a), (loop, b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    state = fast.state_dict()  # resumable into the loop optimizer and back
    loop.load_state_dict(state)
    fast.load_state_dict(loop.state_dict())
