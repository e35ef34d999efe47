"""Fine-tuning's flips (:func:`soilnet.data.augment.draw_flips`, :func:`soilnet.data.augment.flip_batch`) draw and
produce exactly what the implementation they replaced did (fine-tuning's own ``draw_flips``/``augment_image``
with ``torch.where``), so metrics on the same seed are unchanged."""

from __future__ import annotations

import pytest
import torch

from soilnet.data.augment import draw_flips, flip_batch


def old_augment_image(x: torch.Tensor, gen: torch.Generator, flips: torch.Tensor | None = None) -> torch.Tensor:
    """The replaced implementation, verbatim (soilnet/train/finetune.py before issue #16)."""
    flips = torch.rand(x.shape[0], 3, generator=gen) < 0.5 if flips is None else flips
    x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
    x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(flips[:, 2, None, None, None], x.transpose(-1, -2), x)
    return x


@pytest.mark.parametrize("shape", [(64, 3, 8, 8), (33, 2, 5, 7), (1, 4, 6, 6), (0, 2, 4, 4)])
def test_flips_equal_the_old_implementation_on_a_fixed_generator(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    new_gen, old_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    flips = draw_flips(shape[0], new_gen)
    assert torch.equal(flip_batch(x, flips), old_augment_image(x, old_gen))
    assert torch.equal(new_gen.get_state(), old_gen.get_state())  # the same draws, so the next batch's too


def test_a_ranks_rows_of_the_global_draw_are_its_rows_of_the_global_batch():
    x = torch.randn(10, 2, 4, 4)
    flips = draw_flips(10, torch.Generator().manual_seed(0))
    whole = flip_batch(x, flips)
    assert torch.equal(flip_batch(x[3:7], flips[3:7]), whole[3:7])
