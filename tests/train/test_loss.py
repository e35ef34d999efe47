"""Cross-modal NT-Xent: the definition, its options, and global negatives on gloo (2 ranks x B == 1 rank x 2B)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pretrain_kit import free_port
from torch import nn

from soilnet.losses import ContrastiveLoss, nt_xent, retrieval_metrics

B, D = 4, 8
PORT = free_port()


def reference_nt_xent(a, b, tau):
    """The SimCLR definition written out over the 2N embeddings [a; b], positive of i at i +- N."""
    z = F.normalize(torch.cat([a, b]).double(), dim=-1)
    n = a.shape[0]
    sim = z @ z.T / tau
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        total += -(sim[i, pos] - torch.logsumexp(others, 0))
    return total / (2 * n)


def test_matches_the_definition_single_process():
    torch.manual_seed(0)
    a, b = torch.randn(6, D), torch.randn(6, D)
    out = nt_xent(a, b, 0.5)
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss.double(), reference_nt_xent(a, b, 0.5), atol=1e-6)


def test_identical_climate_negatives_are_masked():
    torch.manual_seed(0)
    a, b = torch.randn(4, D), torch.randn(4, D)
    keys = torch.tensor([7, 7, 1, 2])
    out = nt_xent(a, b, 0.5, keys)
    # anchor 0 (image of pair 0) must not use pair 1's image (col 1) or climate (col 5) as negatives
    assert torch.isinf(out.logits[0, 1]) and torch.isinf(out.logits[0, 5]) and torch.isfinite(out.logits[0, 4])
    assert not torch.allclose(out.loss, nt_xent(a, b, 0.5).loss)


def test_learnable_temperature_gets_a_gradient_and_simclr_term_needs_a_view():
    loss = ContrastiveLoss(0.5, learnable=True, simclr_weight=0.5)
    a, b, a2 = (torch.randn(4, D, requires_grad=True) for _ in range(3))
    total, _ = loss(a, b, None, a2)
    total.backward()
    assert loss.log_temperature.grad is not None and torch.isfinite(loss.log_temperature.grad)
    with pytest.raises(ValueError, match="second image view"):
        loss(a, b)


def test_retrieval_metrics_on_perfect_pairs():
    z = torch.eye(4)
    out = nt_xent(z, z, 0.1)
    m = retrieval_metrics(out, z, z)
    assert m["top1"] == 4 and m["rank"] == 4 and m["count"] == 4


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, D))
        self.climate_encoder = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, D))

    def forward(self, x, c):
        return self.image_encoder(x), self.climate_encoder(c)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, 5, generator=g), torch.randn(2 * B, 3, generator=g)


def _loss_and_grads(x, c):
    torch.manual_seed(0)
    model = Pair()
    crit = ContrastiveLoss(0.5, learnable=True)
    loss, _ = crit(*model(x, c))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in [*model.named_parameters(), *crit.named_parameters()]}
    return loss.detach(), grads


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, c = _data()
    loss, grads = _loss_and_grads(x[rank * B : (rank + 1) * B], c[rank * B : (rank + 1) * B])
    dist.all_reduce(loss)  # data parallel: the average of the ranks' losses and gradients
    for g in grads.values():
        dist.all_reduce(g)
    if rank == 0:  # numpy arrays travel by value: tensors would share memory with a process about to exit
        queue.put(((loss / world).numpy(), {k: (g / world).numpy() for k, g in grads.items()}))
    dist.destroy_process_group()


def test_two_ranks_times_b_equal_one_rank_times_2b_loss_and_every_gradient():
    expected_loss, expected = _loss_and_grads(*_data())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, PORT, queue)) for r in range(2)]
    for p in procs:
        p.start()
    sent_loss, sent_grads = queue.get(timeout=120)
    loss, grads = torch.from_numpy(sent_loss), {k: torch.from_numpy(g) for k, g in sent_grads.items()}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert grads.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(grads[k], expected[k], atol=1e-6), k
