"""GradCache on CUDA: its second pass replays the first pass's dropout masks, drawn from the GPU's generator, so
the step's gradient is the full-batch one; and it leaves the GPU's generator where one pass leaves it.

Reuses the CPU tests' network, data and reference gradients (tests/train/test_gradcache.py) on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from gpu_kit import needs_cuda
from test_gradcache import DropNet, data, full_batch_gradients, grad_cache_gradients, parts
from torch import nn

pytestmark = [pytest.mark.gpu, needs_cuda]
CUDA = torch.device("cuda")


def on_gpu() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image, climate = data()
    return DropNet().to(CUDA), image.to(CUDA), climate.to(CUDA)


def test_the_two_passes_draw_identical_dropout_masks_on_cuda():
    """Each dropout layer runs once per micro-batch in the first (no-grad) pass and once in the replay: the
    zeros it leaves in micro-batch k are the same in both passes, and differ between micro-batches."""
    net, image, climate = on_gpu()
    masks: dict[str, list[torch.Tensor]] = {"img.3": [], "clim.1": []}
    for name, module in net.named_modules():
        if name in masks:
            module.register_forward_hook(lambda m, i, out, name=name: masks[name].append((out == 0).cpu()))
    with CUDA:  # the loss's temperature is made where the embeddings are, as in the job's module on the device
        grad_cache_gradients(net, image, climate, seed=7)
    n = len(parts())
    for name, seen in masks.items():
        assert len(seen) == 2 * n, (name, len(seen))
        first, replay = seen[:n], seen[n:]
        assert all(torch.equal(a, b) for a, b in zip(first, replay, strict=True)), name
        assert any(m.any() for m in first) and not torch.equal(first[0], first[1]), name  # real, fresh masks


def test_grad_cache_gives_the_full_batch_gradient_on_cuda():
    net, image, climate = on_gpu()
    with CUDA:
        want = full_batch_gradients(net, image, climate, seed=7)
        got = grad_cache_gradients(copy.deepcopy(net), image, climate, seed=7)
        other = full_batch_gradients(net, image, climate, seed=8)  # other masks, another gradient
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (k, float((got[k] - want[k]).abs().max()))
    assert not torch.allclose(other["img.0.weight"], want["img.0.weight"], rtol=1e-3)


def test_grad_cache_leaves_the_cuda_generator_where_one_pass_leaves_it():
    net, image, climate = on_gpu()
    torch.manual_seed(3)
    with torch.no_grad():
        for s in parts():
            net(image[s], climate[s])
    after_one_pass = torch.cuda.get_rng_state()
    with CUDA:
        grad_cache_gradients(net, image, climate, seed=3)
    assert torch.equal(torch.cuda.get_rng_state(), after_one_pass)
