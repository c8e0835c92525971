"""Training augmentation: the translation style at the source size, JPEG re-encoding, the reference's, CutMix."""

from __future__ import annotations

import numpy as np
import pytest

from model.augmentation import JPEG_QUALITY, ReferenceAugmentation, TranslateAugmentation, cutmix_batch, jpeg_round_trip
from model.preprocessing import preprocess


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_without_any_change_it_is_the_inference_preprocessing():
    pixels = image()
    plain = TranslateAugmentation(pad=0, flip=0.0)
    np.testing.assert_array_equal(plain(pixels, np.random.default_rng(0)), preprocess(pixels))


def test_a_translation_is_a_shifted_window_of_the_reflect_padded_image_and_flips_mirror():
    pixels = image(1)
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    windows = [preprocess(padded[top : top + 32, left : left + 32]) for top in range(9) for left in range(9)]
    mirrored = [preprocess(np.ascontiguousarray(padded[top : top + 32, left : left + 32][:, ::-1]))
                for top in range(9) for left in range(9)]
    shift, both = TranslateAugmentation(pad=4, flip=0.0), TranslateAugmentation(pad=4, flip=1.0)
    for seed in range(10):
        out = shift(pixels, np.random.default_rng(seed))
        assert out.shape == (3, 128, 128) and out.dtype == np.float32
        assert any(np.array_equal(out, w) for w in windows)
        assert any(np.array_equal(both(pixels, np.random.default_rng(seed)), m) for m in mirrored)


def test_the_same_seed_gives_the_same_batch():
    augment = TranslateAugmentation(erasing=0.5, jpeg=0.5)
    a = [augment(image(i), np.random.default_rng(7 + i)) for i in range(8)]
    b = [augment(image(i), np.random.default_rng(7 + i)) for i in range(8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_jpeg_reencoding_is_a_real_jpeg_round_trip_at_a_quality_in_range():
    pixels = image(2)
    augment = TranslateAugmentation(pad=0, flip=0.0, jpeg=1.0)
    out = augment(pixels, np.random.default_rng(3))
    candidates = [preprocess(jpeg_round_trip(pixels, q)) for q in range(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)]
    assert any(np.array_equal(out, c) for c in candidates)
    assert not np.array_equal(out, preprocess(pixels))
    assert np.array_equal(TranslateAugmentation(pad=0, flip=0.0, jpeg=0.0)(pixels, np.random.default_rng(3)),
                          preprocess(pixels))
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        TranslateAugmentation(jpeg=1.5)


def test_erasing_replaces_one_rectangle():
    pixels = np.full((32, 32, 3), 128, np.uint8)
    out = TranslateAugmentation(pad=0, flip=0.0, erasing=1.0)._erase(pixels, np.random.default_rng(0))
    changed = np.argwhere((out != pixels).any(axis=2))
    assert 0.02 * 1024 * 0.5 <= len(changed) <= 0.25 * 1024
    rows, cols = changed[:, 0], changed[:, 1]
    assert len(changed) >= 0.9 * (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one rectangle (noise may match 128)


def test_the_reference_augmentation_still_produces_network_inputs_and_can_reencode():
    out = ReferenceAugmentation(jpeg=1.0)(image(4), np.random.default_rng(0))
    assert out.shape == (3, 128, 128) and out.dtype == np.float32


def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_area_kept():
    # image i is filled with the value i, so every pixel says which image it came from
    batch = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None, None], (8, 3, 32, 32)).copy()
    lams = []
    for seed in range(40):
        mixed, mix = cutmix_batch(batch, np.random.default_rng(seed))
        assert sorted(mix.partner) == list(range(8))
        from_partner = mixed == mix.partner[:, None, None, None]
        own = mixed == np.arange(8)[:, None, None, None]
        moved = np.flatnonzero(mix.partner != np.arange(8))
        assert (from_partner | own).all()
        # the same rectangle in every image and channel, covering 1 - lam of the area
        box = from_partner[moved[0], 0] if len(moved) else None
        if box is not None:
            assert (from_partner[moved] == box).all()
            rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
            assert box.sum() == len(rows) * len(cols)
            assert mix.lam == pytest.approx(1 - box.mean())
        lams.append(mix.lam)
    assert np.array_equal(batch, np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None, None], batch.shape))
    assert 0.0 <= min(lams) and max(lams) <= 1.0 and 0.25 < np.mean(lams) < 0.85  # lam ~ U(0, 1), boxes cut at the border
    again, mix_again = cutmix_batch(batch, np.random.default_rng(39))
    assert np.array_equal(again, mixed) and mix_again.lam == mix.lam
