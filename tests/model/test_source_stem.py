"""Training's fast first layer (model/source_stem.py) against the convolution of the resized image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.preprocessing import IMAGE_SIZE, RESAMPLE
from model.source_stem import PADDING, RESIZE, source_batch
from tests.model.test_alexnet import random_state, relative_error

INSIDE = RESIZE[PADDING:-PADDING]  # the resize without the convolution's zero rows


def resized(source: np.ndarray) -> np.ndarray:
    """[N, C, 32, 32] -> [N, C, 128, 128] by the float bilinear resize the fast layer folds in."""
    return np.einsum("ia,ncab,jb->ncij", INSIDE, source, INSIDE).astype(np.float32)


def test_the_folded_resize_is_pillows_bilinear_resize_before_its_rounding():
    rng = np.random.default_rng(0)
    for image in rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8):
        pillow = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE), np.float32)
        exact = resized(image.transpose(2, 0, 1)[None].astype(np.float32))[0].transpose(1, 2, 0)
        # Pillow rounds to uint8 after each of its two passes: at most one grey level apart
        assert np.abs(exact - pillow).max() <= 1.0 and np.abs(exact - pillow).mean() < 0.35
    assert np.allclose(INSIDE.sum(axis=1), 1.0)  # constants stay constant (so normalizing commutes)
    assert not RESIZE[:PADDING].any() and not RESIZE[-PADDING:].any()


def test_first_convolution_and_its_gradients_equal_the_convolution_of_the_resized_image(paddle):
    from model.alexnet import Conv2D
    from model.source_stem import first_convolution, to_tensors

    rng = np.random.default_rng(1)
    source = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    upstream = paddle.to_tensor(rng.standard_normal((3, 48, 32, 32)).astype(np.float32))
    conv = Conv2D(3, 48, kernel_size=11, stride=4, padding=5)
    conv.set_state_dict(random_state(conv, 2))

    expected = conv(paddle.to_tensor(resized(source)))
    (expected * upstream).sum().backward()
    expected_grads = [conv.weight.grad.numpy().copy(), conv.bias.grad.numpy().copy()]
    conv.clear_gradients()
    got = first_convolution(conv, to_tensors(source_batch(source)))
    (got * upstream).sum().backward()

    assert got.shape == [3, 48, 32, 32]
    assert relative_error(got.numpy(), expected.numpy()) < 1e-5
    assert relative_error(conv.weight.grad.numpy(), expected_grads[0]) < 1e-5
    assert relative_error(conv.bias.grad.numpy(), expected_grads[1]) < 1e-5


@pytest.mark.parametrize("arch", ["alexnet_acmix", "alexnet"])
def test_the_networks_logits_from_the_source_equal_those_of_the_resized_image(paddle, arch):
    from model.alexnet import build_model
    from model.source_stem import forward_from_source

    model = build_model(arch)
    model.set_state_dict(random_state(model, 3))
    model.eval()
    source = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(resized(source))).numpy()
        got = forward_from_source(model, source_batch(source)).numpy()
    assert relative_error(got, expected) < 1e-3  # random weights: rounding grows over 8 layers; conv1 alone is 1e-5


def test_first_convolution_refuses_another_convolution(paddle):
    from model.alexnet import Conv2D
    from model.source_stem import first_convolution, to_tensors

    batch = to_tensors(source_batch(np.zeros((1, 3, 32, 32), np.float32)))
    with pytest.raises(ValueError, match="11x11 convolution of stride 4"):
        first_convolution(Conv2D(3, 48, kernel_size=5, padding=2), batch)
    with pytest.raises(ValueError, match=r"must be \[N, 3, 32, 32\]"):
        source_batch(np.zeros((1, 3, 64, 64), np.float32))


def test_training_batches_take_the_fast_layer_where_the_augmentation_allows():
    from model.augmentation import ReferenceAugmentation, TranslateAugmentation
    from model.source_stem import SourceBatch
    from model.train import augment_batch
    from tests.conftest import synthetic_images

    images = list(synthetic_images(per_class=1, seed=5)[0][:4])
    augment = TranslateAugmentation(erasing=0.5, jpeg=0.5)
    fast, mix = augment_batch(augment, images, np.random.default_rng(6))
    plain = np.stack([augment(image, np.random.default_rng(6)) for image in images[:1]])
    assert isinstance(fast, SourceBatch) and fast.across.shape == (4, 3, 32, 138) and mix is None
    # the same augmented image, as the service's Pillow resize would give it (its rounding apart)
    first, _ = augment_batch(augment, images[:1], np.random.default_rng(6))
    whole = np.einsum("ia,ncab->ncib", INSIDE, first.across[..., PADDING:-PADDING])
    assert np.abs(whole - plain).max() < 1.5 / 255 / 0.224

    reference, _ = augment_batch(ReferenceAugmentation(), images, np.random.default_rng(6))
    larger, _ = augment_batch(augment, list(synthetic_images(per_class=1, seed=5, size=40)[0][:2]),
                             np.random.default_rng(6))
    assert reference.shape == (4, 3, 128, 128) and larger.shape == (2, 3, 128, 128)


def test_an_error_while_augmenting_is_raised_where_batches_are_read_not_a_hang():
    from concurrent.futures import ThreadPoolExecutor

    from model.data import LabeledImages
    from model.train import train_batches
    from tests.conftest import synthetic_images

    images, labels = synthetic_images(per_class=2, seed=7)

    class FailingAugmentation:  # a fake: fails on the third image it sees
        seen = 0

        def __call__(self, image, rng):
            self.seen += 1
            if self.seen == 3:
                raise OSError("broken image 3")
            return np.zeros((3, 128, 128), np.float32)

    data = LabeledImages(list(images), labels, [str(i) for i in range(len(labels))])
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(lambda: list(train_batches(data, 2, FailingAugmentation(), np.random.default_rng(0), None)))
        with pytest.raises(OSError, match="broken image 3"):
            reading.result(timeout=30)
