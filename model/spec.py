"""What the network takes and gives, in every form (Paddle, ONNX, TensorRT, the service).

Kept free of heavy imports so that the service and export tooling can use it without Paddle.
"""

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (3, 128, 128)  # per image, float32, normalized (model/preprocessing.py)
