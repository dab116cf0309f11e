"""Crop windows, the DALI cutter, tiers and cell geometry."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rded.crops import Cutter, CutRequest, image_size
from rded.geometry import cell_boxes, tier_layout
from rded.keyed import crop_window


@pytest.mark.parametrize("w,h", [(160, 213), (300, 90), (64, 64), (17, 500)])
def test_crop_windows_are_square_inside_and_pure(w, h):
    for k in range(200):
        x, y, cw, ch = crop_window(3, f"img{k}", k % 5, w, h)
        assert cw == ch >= 1
        assert 0 <= x and x + cw <= w and 0 <= y and y + ch <= h
        assert crop_window(3, f"img{k}", k % 5, w, h) == (x, y, cw, ch)
    windows = {crop_window(3, "same", k, w, h) for k in range(20)}
    if min(w, h) ** 2 < 0.08 * w * h:  # no square fits: torchvision's centre-crop fallback, every time
        assert windows == {((w - min(w, h)) // 2, (h - min(w, h)) // 2, min(w, h), min(w, h))}
    else:
        assert len(windows) > 1


def test_crop_area_fraction_is_uniform_on_a_square_image():
    # on a square image every first try fits, so the area fraction is uniform on [0.08, 1]
    n = 3000
    fr = np.sort([crop_window(0, f"k{i}", 0, 1000, 1000)[2] ** 2 / 1e6 for i in range(n)])
    cdf = (fr - 0.08) / 0.92
    ks = np.max(np.abs(cdf - (np.arange(1, n + 1) - 0.5) / n))
    assert ks < 1.95 / np.sqrt(n)  # Kolmogorov-Smirnov, p = 0.001


def jpeg(seed: int, size=(90, 70)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_cutter_cuts_exact_windows_and_is_batch_invariant():
    images = [jpeg(i) for i in range(11)]
    reqs = []
    for i, b in enumerate(images):
        w, h = image_size(b)
        wins = [crop_window(0, f"k{i}", k, w, h) for k in range(2)]
        reqs.append(CutRequest(b, wins, [(win[2], win[3]) for win in wins]))
    a = Cutter(2, batch_size=4, num_threads=1, decoder="cpu", device_id=None).cut(reqs)
    b = Cutter(2, batch_size=11, num_threads=2, decoder="cpu", device_id=None).cut(reqs)
    for req, pa, pb in zip(reqs, a, b):
        decoded = np.array(Image.open(io.BytesIO(req.encoded)).convert("RGB"))
        for (x, y, w, h), ca, cb in zip(req.windows, pa, pb):
            # same size in and out: the resize is the identity, so pixels equal Pillow's decode
            assert np.array_equal(ca, decoded[y:y + h, x:x + w])
            assert np.array_equal(ca, cb)


def test_cutter_isolates_an_undecodable_image():
    good = jpeg(1)
    bad = good[: len(good) // 3]
    win = [(0, 0, 20, 20)]
    out = Cutter(1, batch_size=4, num_threads=1, decoder="cpu", device_id=None).cut(
        [CutRequest(good, win, [(8, 8)]), CutRequest(bad, win, [(8, 8)]), CutRequest(good, win, [(8, 8)])])
    assert out[1] is None and out[0] is not None and np.array_equal(out[0][0], out[2][0])
    assert image_size(b"not an image") is None


@pytest.mark.parametrize("tiers,cells", [([1, 10, 50], 4), ([1, 10], 4), ([3], 9), ([2, 5, 7], 1)])
def test_tiers_are_nested_and_rank_strided(tiers, cells):
    layout = tier_layout(tiers, cells, cells * tiers[-1])
    assert len(layout) == tiers[-1]
    prev = 0
    for t in tiers:
        # images [0, t) use exactly the top cells*t ranks: slicing is exact
        assert sorted(r for im in layout[:t] for r in im) == list(range(cells * t))
        n = t - prev
        for j in range(n):
            assert layout[prev + j] == [cells * prev + k * n + j for k in range(cells)]
        prev = t


def test_authors_rank_stride_within_a_single_tier():
    layout = tier_layout([10], 4, 40)
    assert layout[0] == [0, 10, 20, 30] and layout[9] == [9, 19, 29, 39]


def test_short_class_gets_whole_images_only():
    layout = tier_layout([1, 10], 4, 23)  # 23 patches: image 0 (ranks 0-3) and 4 more images
    assert len(layout) == 5
    assert sorted(r for im in layout for r in im) == list(range(20))


@pytest.mark.parametrize("s,f", [(224, 2), (225, 2), (32, 3), (64, 1)])
def test_cells_tile_the_image(s, f):
    covered = np.zeros((s, s), int)
    boxes = cell_boxes(s, f)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all() and len(boxes) == f * f
    assert boxes[0][2] - boxes[0][0] >= boxes[-1][2] - boxes[-1][0]  # first columns take the extra pixel
