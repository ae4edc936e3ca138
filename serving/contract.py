"""The model contract, stated once: what every exported model takes and returns, and how models are named.

The exporter writes models that honour it, the repository and runtime refuse models that do not, and both
APIs validate requests against it. It imports nothing of the project, so training and serving share it.

    input   images         uint8   [N, 1, 28, 28]   raw pixels 0..255, N dynamic; normalisation in the graph
    output  probabilities  float32 [N, 10]          softmax in the graph; index = digit
"""

import re

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
IMAGE_SIDE = 28
IMAGE_SHAPE = (1, IMAGE_SIDE, IMAGE_SIDE)  # one image, after the batch dimension
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10
LABELS = tuple(str(digit) for digit in range(NUM_CLASSES))
INPUT_SHAPE_TEXT = f"[N, {', '.join(map(str, IMAGE_SHAPE))}]"

# Model names are directory names in the repository and appear in URLs and metric labels: a portable subset.
MODEL_NAME_RULE = "1-128 letters, digits, '_', '-', '.', starting with a letter or digit, no '..'"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def is_valid_model_name(name: str) -> bool:
    return bool(_MODEL_NAME.fullmatch(name)) and ".." not in name
