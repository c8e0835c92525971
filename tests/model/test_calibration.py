"""Temperature scaling and the expected calibration error, on synthetic logits of known calibration."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import calibrate, expected_calibration_error, fit_temperature, probabilities, reliability


def sampled(temperature: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / temperature): that temperature calibrates them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, 10))
    probs = probabilities(logits, temperature)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.7, 1.0, 2.5])
def test_the_fitted_temperature_recovers_the_one_the_labels_were_drawn_with(true_temperature):
    logits, labels = sampled(true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_calibration_lowers_the_error_of_an_over_confident_softmax():
    logits, labels = sampled(2.5)
    result = calibrate(logits, labels)
    assert result["ece_before"] > 0.1  # T = 1 on logits that need 2.5 is badly over-confident
    assert result["ece_after"] < 0.02 and result["ece_after_cross_fitted"] < 0.02
    assert result["nll_after"] < result["nll_before"]
    assert (probabilities(logits, result["temperature"]).argmax(1) == logits.argmax(1)).all()  # top-1 kept


def test_ece_of_known_bins():
    # Two images at confidence 0.9, one right one wrong: |0.5 - 0.9| = 0.4; two at 0.6, both right: 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    rows = [row for row in reliability(probs, labels) if row["count"]]
    assert [(row["count"], row["accuracy"]) for row in rows] == [(2, 1.0), (2, 0.5)]


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        fit_temperature(np.zeros((0, 10)), np.zeros(0, dtype=int))
