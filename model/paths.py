"""Where the project's data, split and shipped weights are, relative to the project root.

One place for every default path: training, evaluation, shipping, export and the service read
them from here (the service's settings and the container take theirs from the same names).
"""

from __future__ import annotations

import os
from pathlib import Path

# The 50,000 CIFAR-10 training images, losslessly (PNG), and the same images as JPEG q75
# (../shared/data/README.md), in the shared data folder beside the project, or where ACMIX_DATA_DIR
# says (a clone elsewhere). Training and evaluation default to the lossless ones.
DATA_DIR = os.environ.get("ACMIX_DATA_DIR") or "../shared/data"
DATA = str(Path(DATA_DIR) / "cifar10-train-png.tar.gz")
JPEG_DATA = str(Path(DATA_DIR) / "cifar10-train-jpeg.tar.gz")


WEIGHTS_DIR = Path("model/weights")
WEIGHTS = str(WEIGHTS_DIR / "alexnet_acmix.pdparams")
# The 5,000 training images held out for model selection (never trained on).
SPLIT_FILE = str(WEIGHTS_DIR / "val_split.json")
# The shipped run's record (configuration, history, best epoch), beside the weights.
TRAINING_METRICS = "training_metrics.json"

# The fp32 ONNX that export writes and the service and benchmarks serve; the fp16 and int8 files,
# the reference logits and engines are named after it (runtime/artifacts.py).
ONNX = "build/alexnet_acmix.onnx"
