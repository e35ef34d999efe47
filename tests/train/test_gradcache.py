"""GradCache over accumulation micro-batches, in one CPU process: the gradient of the full-batch step with dropout
masks and BatchNorm batch statistics as in one pass, and BatchNorm running statistics counted once per micro-batch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from soilnet.losses import ContrastiveLoss
from soilnet.train.gradcache import RunningStats, grad_cache

MICRO, BATCH = 4, 12


class DropNet(nn.Module):
    """``(image (b, 6), climate (b, 5)) -> (b, 8), (b, 8)`` with BatchNorm and dropout in the image branch,
    dropout in the climate branch."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 8))
        self.clim = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.GELU(), nn.Linear(16, 8))

    def forward(self, image, climate):
        return self.img(image), self.clim(climate)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 6, generator=g) * 3 + 1, torch.randn(BATCH, 5, generator=g)


def parts():
    return [slice(i, i + MICRO) for i in range(0, BATCH, MICRO)]


def full_batch_gradients(net: nn.Module, image, climate, seed: int) -> dict[str, torch.Tensor]:
    """The full-batch step: every micro-batch embedded with graphs in one pass (each with its own batch
    statistics), one loss over all of them, one backward."""
    net = copy.deepcopy(net)
    torch.manual_seed(seed)
    za, zc = zip(*(net(image[s], climate[s]) for s in parts()), strict=True)
    loss, _ = ContrastiveLoss(0.5)(torch.cat(za), torch.cat(zc))
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def grad_cache_gradients(net: nn.Module, image, climate, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    grad_cache(net, ContrastiveLoss(0.5), MICRO, image, climate, None, None, lambda s, last: s.backward())
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def test_grad_cache_replays_the_dropout_masks_and_gives_the_full_batch_gradient():
    torch.manual_seed(0)
    net = DropNet()
    image, climate = data()
    want = full_batch_gradients(net, image, climate, seed=7)
    got = grad_cache_gradients(copy.deepcopy(net), image, climate, seed=7)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (k, float((got[k] - want[k]).abs().max()))
    # the masks matter: other masks give another gradient, so the match above is not one by chance
    other = full_batch_gradients(net, image, climate, seed=8)
    assert not torch.allclose(other["img.0.weight"], want["img.0.weight"], rtol=1e-3)


def test_grad_cache_leaves_the_rng_where_one_pass_over_the_batch_leaves_it():
    net = DropNet()
    image, climate = data()
    torch.manual_seed(3)
    with torch.no_grad():
        for s in parts():
            net(image[s], climate[s])
    after_one_pass = torch.get_rng_state()
    grad_cache_gradients(net, image, climate, seed=3)
    assert torch.equal(torch.get_rng_state(), after_one_pass)


def test_batchnorm_running_statistics_count_each_micro_batch_once_as_a_plain_step_does():
    """Each micro-batch updates the running statistics once (not once per GradCache pass), from the step's
    starting values; the step keeps their mean: what plain steps on each micro-batch from the same start give,
    averaged, as data-parallel ranks holding one micro-batch each do."""
    torch.manual_seed(0)
    net = DropNet().eval()
    image, climate = data()
    with torch.no_grad():  # a start that is not BatchNorm's initial state
        net.img[1].running_mean.uniform_(-1, 1)
        net.img[1].running_var.uniform_(0.5, 2)
        net.img[1].num_batches_tracked.fill_(5)
    net.train()
    plain = []
    for s in parts():
        one = copy.deepcopy(net)
        one(image[s], climate[s])[0].sum().backward()
        plain.append(one.img[1])
    grad_cache_gradients(net, image, climate, seed=0)
    bn = net.img[1]
    mean = torch.stack([p.running_mean for p in plain]).mean(0)
    var = torch.stack([p.running_var for p in plain]).mean(0)
    assert torch.allclose(bn.running_mean, mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(bn.running_var, var, rtol=1e-6, atol=1e-7)
    assert int(bn.num_batches_tracked) == 6  # one step: one more batch, however many micro-batches and passes


def test_running_stats_mean_is_the_same_for_any_split_of_the_micro_batches():
    """1 rank x 3 micro-batches and 3 ranks x 1 micro-batch sum the same float64 values: the same buffers."""
    net = DropNet()
    stats = RunningStats(net)
    start = stats.snapshot()
    image, climate = data()
    flats = []
    for s in parts():
        net(image[s], climate[s])
        flats.append(stats.flat())
        stats.restore(start)
    stats.set_mean(flats[0] + flats[1] + flats[2], 3, 1)
    one = [b.clone() for b in stats.buffers]
    stats.restore(start)
    stats.set_mean(flats[2] + (flats[0] + flats[1]), 3, 1)  # other order, as another split would sum them
    assert all(torch.equal(a, b) for a, b in zip(one, stats.buffers, strict=True))
