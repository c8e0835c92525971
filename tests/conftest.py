"""Fixtures shared by the whole suite: small data sets made on the spot, in both formats."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.tiny_model import write_tiny_model
from model import paths
from model.data import CLASSES
from model.spec import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME

SHARED_DATA = (Path(__file__).resolve().parents[1] / paths.JPEG_DATA).resolve()  # ACMIX_DATA_DIR, or ../shared/data
SHARED_PNG_DATA = SHARED_DATA.with_name("cifar10-train-png.tar.gz")


def synthetic_images(per_class: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, size, size, 3] images whose class is readable from their color, and labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    hues = np.linspace(0, 255, len(CLASSES), endpoint=False)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3)).astype(np.int16)
    images[..., 0] += hues[labels, None, None].astype(np.int16) // 2
    images[..., 2] += (255 - hues[labels, None, None]).astype(np.int16) // 2
    return np.clip(images, 0, 255).astype(np.uint8), labels


def jpeg_bytes(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train") -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / prefix / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(jpeg_bytes(image, "PNG"))
    return root


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_python_tarball(path: Path, train: tuple, test: tuple) -> Path:
    """The official cifar-10-python.tar.gz layout: 5 training batches and test_batch."""
    files = {}
    train_images, train_labels = train
    for i, chunk in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        files[f"cifar-10-batches-py/data_batch_{i}"] = _batch(train_images[chunk], train_labels[chunk])
    files["cifar-10-batches-py/test_batch"] = _batch(*test)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES]})
    return write_tar(path, files)


def _batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"data": data, b"labels": [int(x) for x in labels]})


@pytest.fixture(scope="session")
def paddle():
    from model.runtime import import_paddle

    return import_paddle()


@pytest.fixture(scope="session")
def weights(tmp_path_factory, paddle):
    """AlexNet-ACmix weights, seeded, with logits in a trained network's range."""
    from model.alexnet import AlexNet_ACmix

    paddle.seed(7)
    model = AlexNet_ACmix()
    # Freshly initialized, the network's logits span about +-50; a trained one's about +-10.
    # Scale the last layer to the trained range so that the 1e-4 logit tolerance means the same.
    last = model.classifier[-1]
    last.weight.set_value(last.weight * 0.2)
    last.bias.set_value(last.bias * 0.2)
    path = tmp_path_factory.mktemp("weights") / "acmix.pdparams"
    paddle.save(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def onnx_model(weights, tmp_path_factory) -> Path:
    """Those weights exported to ONNX once per test session."""
    from export.onnx_export import export_onnx

    return export_onnx(weights, tmp_path_factory.mktemp("onnx") / "alexnet_acmix.onnx")


@pytest.fixture
def folder_dataset(tmp_path):
    images, labels = synthetic_images(per_class=3)
    return write_class_folders(tmp_path / "folder", images, labels), labels


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_file():
        pytest.skip(f"the CIFAR-10 training archive is not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def shared_png_data() -> Path:
    if not SHARED_PNG_DATA.is_file():
        pytest.skip(f"the lossless CIFAR-10 training archive is not at {SHARED_PNG_DATA}")
    return SHARED_PNG_DATA


@pytest.fixture(scope="session")
def shipped_onnx(tmp_path_factory) -> Path:
    """The shipped weights exported to ONNX once per test session (for figures on real images)."""
    from export.onnx_export import export_onnx
    from model import paths

    return export_onnx(paths.WEIGHTS, tmp_path_factory.mktemp("shipped") / "alexnet_acmix.onnx")


# --- tiny ONNX models with the real contract (harness/tiny_model.py) ---


def run_onnx(path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def subnormal_float32(bits: int = 0x000AE398) -> np.float32:
    """A subnormal float32 (default ~1e-39) made from its bits: converting a Python float would give
    0 in a thread that flushes denormals, as every thread that has run ONNX Runtime does
    (runtime/cpu.py)."""
    value = np.array([bits], np.uint32).view(np.float32)[0]
    assert 0 < bits < 0x00800000
    return value


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *INPUT_SHAPE)).astype(np.float32)


@pytest.fixture
def tiny_onnx(tmp_path):
    """The tiny fp32 model, written to tmp_path/tiny.onnx."""
    return write_tiny_model(tmp_path / "tiny.onnx")


def tiny_model_with_reference(folder: Path) -> Path:
    """The tiny model as folder/alexnet_acmix.onnx, with reference logits of synthetic images beside it
    (computed by ONNX Runtime), as a server checks its model against at start."""
    from model.preprocessing import decode_image, preprocess
    from runtime.reference import Reference, reference_path

    path = write_tiny_model(folder / "alexnet_acmix.onnx")
    images, _ = synthetic_images(per_class=2, seed=9)
    files = [jpeg_bytes(image, "PNG") for image in images[:16]]
    logits = run_onnx(path, np.stack([preprocess(decode_image(f)) for f in files]))
    reference_path(path).write_text(Reference(files, logits, "synthetic images").to_json())
    return path
