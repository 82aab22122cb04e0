"""Batched augmentation (dataset.augment_batch) against the per-image train_transform: the same
distribution of draws, the same geometry, and exactly eval_transform when nothing is drawn."""
import math

import torch
from torchvision.transforms import v2

import dataset as ds

N = 20000


def smooth_batch(n=4, size=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 255
    return torch.nn.functional.avg_pool2d(x, 9, 1, 4).round().byte()


def test_with_every_probability_zero_it_is_eval_transform():
    x = smooth_batch()
    out = ds.augment_batch(x, 112, augment_p=0.0, flip_p=0.0)
    assert torch.allclose(out, ds.eval_transform()(x), atol=1e-6)


def test_a_flip_is_an_exact_mirror():
    x = smooth_batch()
    out = ds.augment_batch(x, 112, augment_p=0.0, flip_p=1.0)
    assert torch.allclose(out, ds.eval_transform()(x.flip(-1)), atol=1e-5)


def test_the_crop_box_matches_torchvision_resized_crop():
    x = smooth_batch(1)
    top, left, h, w = 10, 20, 90, 80
    p = ds.augment_params(1, 0.0, 0.0)
    p.update(w=torch.tensor([w / 112]), h=torch.tensor([h / 112]),
             cx=torch.tensor([(left + w / 2) / 112]), cy=torch.tensor([(top + h / 2) / 112]))
    ref = ds.eval_transform()(v2.functional.resized_crop(x, top, left, h, w, [112, 112],
                                                         antialias=False))
    diff = (ds.apply_augment(x, p, 112) - ref).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.05  # one uint8 level is ~0.017


def test_the_draws_follow_train_transform():
    p = ds.augment_params(N, augment_p=0.8, generator=torch.Generator().manual_seed(1))
    tol = 4 * math.sqrt(0.25 / N)  # four standard errors of a rate
    assert abs(p["flip"].float().mean() - 0.5) < tol
    cropped = (p["w"] < 1) | (p["h"] < 1)
    assert abs(cropped.float().mean() - 0.8) < tol
    area, aspect = (p["w"] * p["h"])[cropped], (p["w"] / p["h"])[cropped]
    assert area.min() >= 0.7 and area.max() <= 1.0
    assert aspect.min() >= 0.9 - 1e-6 and aspect.max() <= 1.1 + 1e-6
    # torchvision's own draws for a 112 px image: the same spread of scale and aspect
    boxes = torch.tensor([v2.RandomResizedCrop.get_params(torch.empty(3, 112, 112),
                                                          list(ds.CROP_SCALE), list(ds.CROP_RATIO))
                          for _ in range(4000)], dtype=torch.float32)
    tv_area = boxes[:, 2] * boxes[:, 3] / 112 ** 2
    for q in (0.1, 0.5, 0.9):
        assert abs(area.quantile(q) - tv_area.quantile(q)) < 0.02, q
    inside = (p["cx"] - p["w"] / 2 >= -1e-6) & (p["cx"] + p["w"] / 2 <= 1 + 1e-6)
    assert inside.all()
    for key in ("brightness", "contrast", "saturation"):
        f = p[key]
        assert f.min() >= 0.7 and f.max() <= 1.3
        assert abs((f != 1).float().mean() - 0.8) < tol
        assert abs(f[f != 1].mean() - 1.0) < 0.01  # uniform around 1
    assert abs(p["grey"].float().mean() - 0.08) < tol


def test_each_image_gets_its_own_draw_and_a_seed_repeats_it():
    x = smooth_batch(8)
    a = ds.augment_batch(x, 112, 0.8, generator=torch.Generator().manual_seed(3))
    b = ds.augment_batch(x, 112, 0.8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    same = ds.augment_batch(x[:1].expand(8, -1, -1, -1).contiguous(), 112, 1.0,
                            generator=torch.Generator().manual_seed(4))
    assert len({tuple(v.flatten()[:50].tolist()) for v in same}) == 8


def test_colour_statistics_match_the_per_image_transform():
    """Mean brightness and its spread over many augmented copies of one photo agree with
    train_transform's, image by image, within four standard errors."""
    x, n = smooth_batch(1), 600
    torch.manual_seed(0)
    batch = ds.augment_batch(x.expand(n, -1, -1, -1).contiguous(), 112, 0.8).mean((1, 2, 3))
    per_image = torch.stack([ds.train_transform(112, 0.8)(x[0]) for _ in range(n)]).mean((1, 2, 3))
    se = per_image.std() * math.sqrt(2 / n)
    assert abs(batch.mean() - per_image.mean()) < 4 * se
    assert abs(batch.std() - per_image.std()) < 4 * se / math.sqrt(2) + 0.01


def erased_share(out):
    """The share of each image's pixels that erasing set to the mean (0 after normalising)."""
    return (out == 0).all(1).float().mean((1, 2))


def test_erasing_is_one_rectangle_of_the_drawn_size_and_is_off_by_default():
    x = smooth_batch(200) | 1  # no pixel at exactly the mean colour before erasing
    assert erased_share(ds.augment_batch(x, 112, 0.0, 0.0)).max() == 0
    g = torch.Generator().manual_seed(5)
    p = ds.augment_params(200, 0.0, 0.0, generator=g, erase_p=1.0)
    out = ds.apply_augment(x, p, 112)
    share = erased_share(out)
    assert torch.allclose(share, p["ew"] * p["eh"], atol=0.03)  # whole pixels round the edges
    assert share.min() > 0.005 and share.max() < 0.23
    for img, ex, ey in zip(out[:20], p["ex"], p["ey"]):
        rows, cols = (img == 0).all(0).nonzero().unbind(1)
        block = img[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (block == 0).all()  # a filled rectangle
        assert abs(cols.min() / 112 - ex) < 0.02 and abs(rows.min() / 112 - ey) < 0.02


def test_erasing_rate_and_sizes_match_torchvision_random_erasing():
    x, n = smooth_batch(1) | 1, 2000
    torch.manual_seed(0)
    batch = erased_share(ds.augment_batch(x.expand(n, -1, -1, -1).contiguous(), 112, 0.0, 0.0,
                                          erase_p=0.5))
    ref = v2.RandomErasing(p=0.5, scale=ds.ERASE_SCALE, ratio=ds.ERASE_RATIO)
    per_image = erased_share(torch.stack([ref(ds.eval_transform()(x[0])) for _ in range(n)]))
    tol = 4 * math.sqrt(0.25 / n)
    assert abs((batch > 0).float().mean() - 0.5) < tol
    assert abs((per_image > 0).float().mean() - 0.5) < tol
    for q in (0.25, 0.5, 0.75):
        assert abs(batch[batch > 0].quantile(q) - per_image[per_image > 0].quantile(q)) < 0.015, q
    # and the per-image transform that the trainers build erases as well
    assert (erased_share(ds.train_transform(112, 0.0, erase_p=1.0)(x[0])[None]) > 0).all()
