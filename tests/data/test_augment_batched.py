"""Batched augmentation (:mod:`soilnet.data.augment`): the draws are a fixed counter-based function of (seed,
epoch, sample id) with the right distribution, and the batched form (on the training device, after the copy)
gives exactly the per-sample definition's values for the same draws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from soilnet.config.schema import SchemaConfig
from soilnet.data import LoaderSpec, PretrainBatches, native, open_shards
from soilnet.data.augment import (
    AugmentSpec,
    augment_image,
    augment_images,
    draw,
    mix32,
    reflect_index,
)
from soilnet.data.device import augment_batch


def _random_draws(spec: AugmentSpec, b: int, c: int, h: int, w: int):
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(h * 100 + w * 10 + spec.pad))
    return x, draw(spec, 5, 2, torch.arange(b) * 7 + 3, 2, (c, h, w), (4, 3))


@pytest.mark.parametrize("gather", [False, True], ids=["cpu-form", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,w,pad", [(8, 8, 3), (7, 7, 0), (6, 6, 6), (5, 5, 11), (5, 7, 2), (64, 64, 16), (1, 1, 2)])
def test_batched_views_equal_the_per_sample_definition_on_the_same_draws(h, w, pad, dtype, gather):
    specs = [
        AugmentSpec(pad=pad, spectral_jitter=0.1),
        AugmentSpec(pad=pad, flips=False),
        AugmentSpec(pad=pad, rotate=False, spectral_jitter=0.2),
    ]
    for spec in specs:
        x, d = _random_draws(spec, 24 if h < 64 else 6, 3, h, w)
        x = x.to(dtype)
        for v in range(2):
            got = augment_images(x, spec, d, v, gather=gather)
            assert got.dtype == dtype and got.shape == x.shape
            for b in range(len(x)):
                want = torch.from_numpy(augment_image(x[b].float().numpy(), spec, d.view(v, b))).to(dtype)
                assert torch.equal(got[b], want), (spec, v, b, d.view(v, b))


def test_every_dihedral_element_and_crop_corner_matches_the_definition():
    """All 8 flip/turn combinations with every corner, through both batched forms, on one 7 x 7 patch."""
    spec = AugmentSpec(pad=3)
    x = torch.randn(1, 2, 7, 7)
    combos = list(itertools.product((False, True), (False, True), range(4), range(7), range(7)))
    n = len(combos)
    fw, fh, turns, top, left = (torch.tensor([c[k] for c in combos])[None] for k in range(5))
    d = draw(spec, 0, 0, torch.zeros(n, dtype=torch.int64), 1, (2, 7, 7), (1, 1))
    d = type(d)(fw, fh, turns, top, left, None, None)
    batch = x.expand(n, -1, -1, -1).contiguous()
    for gather in (False, True):
        got = augment_images(batch, spec, d, 0, gather=gather)
        for b in range(n):
            want = augment_image(x[0].numpy(), spec, d.view(0, b))
            np.testing.assert_array_equal(got[b].numpy(), want)


@pytest.mark.skipif(not native.available(), reason="soilnet.data._native is not built (no C compiler)")
def test_the_cpu_form_of_float32_square_patches_is_one_pass_of_the_c_kernel(monkeypatch):
    """On a CPU, float32 square patches go through ``soilnet_views`` (the equality tests above then check it);
    bfloat16 and non-square patches through the gather."""
    calls = []
    real = native.views
    monkeypatch.setattr(native, "views", lambda *args: calls.append(args[0].shape) or real(*args))
    spec = AugmentSpec(pad=4, spectral_jitter=0.1)
    for shape, dtype in (((8, 8), torch.float32), ((8, 8), torch.bfloat16), ((6, 8), torch.float32)):
        x, d = _random_draws(spec, 4, 3, *shape)
        augment_images(x.to(dtype), spec, d, 0, gather=False)
    assert calls == [(4, 3, 8, 8)]


def test_reflect_index_is_np_pad_reflect_even_past_the_edge():
    for n, pad in itertools.product((1, 2, 3, 7), (0, 1, 2, 5, 9)):
        want = np.pad(np.arange(n), pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad, dtype=int)
        assert reflect_index(n, pad).tolist() == want.tolist(), (n, pad)


def test_draws_are_a_fixed_function_of_seed_epoch_and_id():
    spec = AugmentSpec(spectral_jitter=1.0, climate_jitter=1.0)
    ids = torch.arange(200) * 3
    whole = draw(spec, 7, 4, ids, 2, (3, 16, 16), (5, 2))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    part = draw(spec, 7, 4, ids[perm[:50]], 2, (3, 16, 16), (5, 2))  # another batch holding some of the samples
    for name in ("flip_w", "flip_h", "turns", "top", "left", "spectral"):
        assert torch.equal(getattr(part, name), getattr(whole, name)[:, perm[:50]]), name
    assert torch.equal(part.climate, whole.climate[perm[:50]])
    other_epoch = draw(spec, 7, 5, ids, 2, (3, 16, 16), (5, 2))
    assert not torch.equal(other_epoch.top, whole.top) and not torch.equal(other_epoch.spectral, whole.spectral)
    # pinned: changing these values changes every run's augmentations (and a resume across the change)
    d = draw(spec, 0, 0, torch.arange(4), 2, (2, 8, 8), (1, 2))
    assert d.turns.tolist() == [[1, 1, 1, 2], [0, 0, 0, 0]]
    assert d.top.tolist() == [[13, 30, 2, 29], [7, 8, 23, 4]]
    assert d.left.tolist() == [[2, 14, 14, 10], [3, 1, 20, 17]]
    assert d.flip_w.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert d.flip_h.tolist() == [[False, False, False, False], [True, False, True, True]]
    assert [mix32(0), mix32(1), mix32(0xFFFFFFFF)] == [0, 1753845952, 1734902346]


def _within(count: torch.Tensor, n: int, p: float, sigmas: float = 5.0) -> bool:
    """Binomial counts within ``sigmas`` standard deviations of ``n p``."""
    return bool(((count.double() - n * p).abs() <= sigmas * (n * p * (1 - p)) ** 0.5).all())


def test_draws_have_the_definitions_distribution():
    n, spec = 100_000, AugmentSpec(pad=16, spectral_jitter=0.5, climate_jitter=2.0)
    d = draw(spec, 11, 3, torch.arange(n), 2, (4, 64, 64), (6, 5))
    for v in range(2):
        assert _within(d.flip_w[v].sum(), n, 0.5) and _within(d.flip_h[v].sum(), n, 0.5)
        assert _within((d.flip_w[v] & d.flip_h[v]).sum(), n, 0.25)  # independent flips
        assert _within(torch.bincount(d.turns[v], minlength=4), n, 0.25)  # each rotation equally likely
        for corner in (d.top[v], d.left[v]):  # uniform over the 33 positions, as a chi-square test
            counts = torch.bincount(corner, minlength=33).double()
            assert len(counts) == 33
            chi2 = float(((counts - n / 33) ** 2 / (n / 33)).sum())
            assert chi2 < 70.0, chi2  # 32 degrees of freedom: P(chi2 > 70) is about 1e-4
        assert _within((d.top[v] < 16).sum(), n, 16 / 33)
    assert _within((d.flip_w[0] & d.flip_w[1]).sum(), n, 0.25)  # the two views are independent
    for noise, sigma in ((d.spectral, 0.5), (d.climate, 2.0)):
        z = noise.flatten().double() / sigma
        assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
        assert abs(float((z.abs() < 1).double().mean()) - 0.6827) < 0.005  # Gaussian, not only its moments


def test_a_non_square_patch_crops_where_the_turned_patch_fits():
    spec = AugmentSpec(pad=2)
    d = draw(spec, 1, 0, torch.arange(20_000), 1, (1, 5, 9), (1, 1))
    even, odd = d.turns[0] % 2 == 0, d.turns[0] % 2 == 1
    assert int(d.top[0][even].max()) == 4 and int(d.left[0][even].max()) == 4  # rows 5 + 4 - 5, cols 9 + 4 - 9
    assert int(d.top[0][odd].max()) == 8 and int(d.left[0][odd].max()) == 0  # turned: 9 rows, 5 columns


@pytest.mark.parametrize("channels", [None, ["NDVI", "SR_B4", "SR_B7"]])
def test_a_loader_batch_augmented_on_the_device_is_the_per_sample_definition(shards, channels):
    s = open_shards(shards, SchemaConfig(channels=channels) if channels else SchemaConfig())
    aug = AugmentSpec(pad=16, spectral_jitter=0.05, climate_jitter=0.05)
    step = 5  # epoch 1 of 4 steps each
    sp = LoaderSpec(seed=3, global_batch=16, rank=0, world=1, augment=aug, two_views=True)
    base = PretrainBatches(s, sp).batch(step)
    assert base["epoch"] == 1
    got = augment_batch(base, sp)
    d = draw(aug, 3, 1, base["ids"], 2, tuple(base["image"].shape[1:]), tuple(base["climate"].shape[1:]))
    for row in range(len(base["ids"])):
        view1 = augment_image(base["image"][row].numpy(), aug, d.view(0, row))
        view2 = augment_image(base["image"][row].numpy(), aug, d.view(1, row))
        climate = base["climate"][row].numpy() + d.climate[row].numpy()  # the climate's jitter, added once
        np.testing.assert_array_equal(got["image"][row].numpy(), view1)
        np.testing.assert_array_equal(got["image2"][row].numpy(), view2)
        np.testing.assert_array_equal(got["climate"][row].numpy(), climate)
    assert not torch.equal(got["image"], got["image2"])
