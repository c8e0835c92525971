"""runtime/reference.py: how far each precision's logits may be from the reference logits."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.reference import Reference, ReferenceError, compare


def reference(logits) -> Reference:
    return Reference(images=[b""] * len(logits), logits=np.asarray(logits, np.float32), source="test")


# Two reference images: a typical one (largest logit 8) and an extreme one (40), as wide-margin
# images often are.
LOGITS = [[8.0, -2.0, 1.0], [40.0, -5.0, 3.0]]


def test_int8_may_differ_more_where_the_image_s_logits_are_larger():
    """int8 clips activations at its calibrated range: an extreme image's top logit comes out lower."""
    got = np.array(LOGITS) - [[0.9, 0, 0], [5.5, 0, 0]]  # 5.5 <= 0.15 x 40
    result = compare(got, reference(LOGITS), "int8")
    assert result["max_abs_diff"] == pytest.approx(5.5) and result["worst_image"] == 1
    assert result["tolerance"] == pytest.approx(6.0)


def test_int8_keeps_its_absolute_bound_on_a_typical_image():
    got = np.array(LOGITS) - [[1.5, 0, 0], [0, 0, 0]]  # 1.5 > max(1.0, 0.15 x 8)
    with pytest.raises(ReferenceError, match=r"1\.5 on reference image 0 over its int8 tolerance 1\.2"):
        compare(got, reference(LOGITS), "int8")


def test_fp32_has_no_share_of_the_logits():
    got = np.array(LOGITS) + [[0, 0, 0], [0.01, 0, 0]]
    with pytest.raises(ReferenceError, match="reference image 1 over its fp32 tolerance 0.001"):
        compare(got, reference(LOGITS), "fp32")


def test_a_changed_top1_the_tolerance_cannot_explain_fails():
    got = np.array(LOGITS)
    got[0] = [1.0, -2.0, 1.5]  # the two best were 7 apart: more than twice int8's 1.2
    with pytest.raises(ReferenceError, match="top-1 class of 1 of 2 reference images changed .first: image 0, whose "
                                             "two best logits were 7 apart"):
        compare(got, reference(LOGITS), "int8")


def test_two_logits_closer_than_twice_the_tolerance_may_swap():
    """Generated noise images (the reference where the export had no data) have narrow margins."""
    narrow = [[2.0, 1.5, -1.0], *LOGITS[1:]]
    got = np.array(narrow) + [[-0.4, 0.3, 0], [0, 0, 0]]  # within 1.0, and now 1.8 for class 1
    result = compare(got, reference(narrow), "int8")
    assert result["top1_changed"] == 1
    with pytest.raises(ReferenceError, match="top-1 class of 1 of 2"):  # fp32: 0.5 apart > 2 x 0.001
        compare(np.array(narrow) + [[0, 0.6, 0], [0, 0, 0]], reference(narrow), "fp32")


def test_a_non_finite_logit_fails():
    got = np.array(LOGITS)
    got[1, 2] = np.nan
    with pytest.raises(ReferenceError, match="reference check failed"):
        compare(got, reference(LOGITS), "int8")
