"""On-device augmentation must match torchvision's RandomCrop(padding=4) + RandomHorizontalFlip in distribution."""
import numpy as np
import torch

from bdsafety.data.device import DeviceDataset, Normalizer, iterate_batches, random_crop_flip
from bdsafety.data.info import DATASETS


def _positions(batch: torch.Tensor) -> list[tuple[int, int]]:
    """Where the single marked pixel (value 255) landed in each augmented image (-1, -1 if cropped away)."""
    out = []
    for img in batch[:, 0]:
        nz = (img == 255).nonzero()
        out.append(tuple(nz[0].tolist()) if len(nz) else (-1, -1))
    return out


def test_crop_flip_matches_torchvision_distribution():
    import torchvision.transforms as T

    torch.manual_seed(0)
    n = 4000
    img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    img[0, :, 2, 1] = 255  # a marker pixel
    ours = _positions(random_crop_flip(img.repeat(n, 1, 1, 1), pad=4, flip=True,
                                       generator=torch.Generator().manual_seed(1)))
    tv = T.Compose([T.RandomCrop(8, padding=4), T.RandomHorizontalFlip()])
    theirs = _positions(torch.stack([tv(img[0]) for _ in range(n)]))

    def hist(pos):
        keys = sorted({p for p in ours + theirs})
        c = np.array([sum(1 for q in pos if q == k) for k in keys], dtype=float)
        return c / c.sum()

    h1, h2 = hist(ours), hist(theirs)
    # total-variation distance between the two empirical distributions over marker positions
    assert 0.5 * np.abs(h1 - h2).sum() < 0.06
    # marker row offset is uniform over 9 values (crop offset 0..8) -> cropped away for 2 of 9 row offsets... check both
    # see drops
    assert any(p == (-1, -1) for p in ours) and any(p == (-1, -1) for p in theirs)


def test_crop_keeps_content_and_shape():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = random_crop_flip(x, pad=0, flip=False)
    assert torch.equal(x, y)
    z = random_crop_flip(x, pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert z.shape == x.shape and z.dtype == torch.uint8
    # every augmented image is a shifted (and maybe flipped) copy: its centre 24x24 occurs in the padded original
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        found = False
        for cand in (z[i], z[i].flip(2)):
            for oy in range(9):
                for ox in range(9):
                    if torch.equal(xp[i, :, oy : oy + 32, ox : ox + 32], cand):
                        found = True
        assert found


def test_iterate_batches_covers_everything_once_and_normalizes():
    x = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    ds = DeviceDataset(x, np.arange(10))
    seen = torch.cat([idx for _, _, idx in iterate_batches(ds, 3, shuffle=True,
                                                           generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    norm = Normalizer(DATASETS["cifar10"])
    xb = ds.x[:2]
    back = norm.denormalize(norm.from_uint8(xb))
    assert torch.allclose(back, xb.float() / 255, atol=1e-6)
    assert np.array_equal(ds.numpy_images(), x)


def test_window_crop_equals_the_gather_exactly():
    """The CPU's window crop (bdsafety.data.device._crop_unfold) and the gather used on other devices cut the same
    pixels: identical outputs for the same draws, with and without flip, with a resize-crop size, uint8 and float."""
    from bdsafety.data.device import _crop_gather, _crop_unfold

    g = torch.Generator().manual_seed(3)
    for n, h, pad, size, flip, dtype in ((128, 32, 4, None, True, torch.uint8), (7, 32, 4, None, False, torch.uint8),
                                         (300, 36, 0, 32, True, torch.uint8), (64, 16, 2, 16, True, torch.float32),
                                         (1, 8, 4, None, True, torch.uint8)):
        x = torch.randint(0, 256, (n, 3, h, h), generator=g).to(dtype)
        oh = size or h
        xp = torch.nn.functional.pad(x, (pad,) * 4)
        oy = torch.randint(0, h + 2 * pad - oh + 1, (n,), generator=g)
        ox = torch.randint(0, h + 2 * pad - oh + 1, (n,), generator=g)
        f = torch.rand(n, generator=g) < 0.5 if flip else None
        a, b = _crop_gather(xp, oy, ox, f, oh, oh), _crop_unfold(xp, oy, ox, f, oh, oh)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
        for i in range(min(n, 5)):  # and both are the crop the draws name
            want = xp[i, :, oy[i]:oy[i] + oh, ox[i]:ox[i] + oh]
            assert torch.equal(a[i], want.flip(2) if f is not None and f[i] else want)


def test_from_uint8_is_bit_identical_to_normalising_x_over_255():
    norm = Normalizer(DATASETS["cifar10"], "cpu")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(norm.from_uint8(x), (x.float() / 255.0 - norm.mean) / norm.std)
