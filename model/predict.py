"""Batched Paddle inference over decoded images with the one inference preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.files import missing
from model.preprocessing import preprocess


def predict_logits(model, images, batch_size: int = 128, progress: str | None = None) -> np.ndarray:
    """float32 [N, classes] logits of a Paddle model (put in eval mode) for uint8 HxWx3 images."""
    import paddle

    model.eval()
    chunks = []
    starts = range(0, len(images), batch_size)
    with paddle.no_grad():
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
            batch = np.stack([preprocess(image) for image in images[start : start + batch_size]])
            chunks.append(model(paddle.to_tensor(batch)).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def preprocessed_logits(model, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    """float32 [N, classes] logits of a Paddle model (put in eval mode) for a preprocessed float32
    [N, 3, 128, 128] batch, `chunk` images at a time."""
    import paddle

    model.eval()
    with paddle.no_grad():
        return np.concatenate([model(paddle.to_tensor(batch[i : i + chunk])).numpy()
                               for i in range(0, len(batch), chunk)])


def load_weights(arch: str, weights: str):
    """A model of `arch` with the weights of a `.pdparams` file; ValueError naming the file if unusable."""
    from model.alexnet import build_model

    model = build_model(arch)
    model.set_state_dict(read_state(model, weights, arch))
    model.eval()
    return model


def read_state(model, weights: str | Path, arch: str) -> dict:
    """The state dict of a `.pdparams` file, checked against `model` (an `arch`): ValueError naming
    the file where it is missing, not Paddle's, or holds another network's parameters (Paddle
    itself only warns and leaves those parameters as they were)."""
    import paddle

    if why := missing(weights, "weights file"):
        raise ValueError(why)
    try:
        state = paddle.load(str(weights))
    except Exception as exc:  # paddle.load raises many types for a bad file
        raise ValueError(f"{weights}: not a Paddle .pdparams file ({exc.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: not a state dict")
    expected = model.state_dict()
    absent = sorted(set(expected) - set(state))
    if absent:
        raise ValueError(f"{weights}: not {arch} weights (missing {absent[0]} and {len(absent) - 1} more)")
    for key, value in expected.items():
        if list(value.shape) != list(state[key].shape):
            raise ValueError(f"{weights}: {key} has shape {list(state[key].shape)}, {arch} needs {list(value.shape)}")
    return state
