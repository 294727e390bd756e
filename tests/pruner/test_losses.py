import torch

from e3kernels import fused_linear_kd_loss
from e3pruner.losses import kd_from_hidden


def test_kd_from_hidden_is_the_fused_loss_of_flattened_rows():
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ws, wt = torch.randn(11, 8, generator=g), torch.randn(11, 8, generator=g)
    got = kd_from_hidden(hs, ws, ht, wt, weighting="none", reduction="sum")
    want = fused_linear_kd_loss(hs.reshape(10, 8), ws, ht.reshape(10, 8), wt,
                                weighting="none", reduction="sum")
    assert torch.equal(got.loss, want.loss)
    shared = kd_from_hidden(hs, ws, ht, reduction="none")  # the teacher head defaults to ws
    assert torch.equal(shared.loss, fused_linear_kd_loss(hs.reshape(10, 8), ws, ht.reshape(10, 8),
                                                         ws, reduction="none").loss)
    bf = kd_from_hidden(hs, ws, ht, wt, amp="bf16", weighting="none", reduction="sum")
    assert not torch.equal(bf.loss, got.loss)  # the rows reach the head in bf16
