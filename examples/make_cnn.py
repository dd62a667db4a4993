"""Build examples/cnn.onnx (a small image classifier, random weights) and examples/image.npy.

    python examples/make_cnn.py

The model is written the way exporters write CNNs: Conv + BatchNormalization + ReLU, max
pooling, a depthwise conv with ReLU6 (Clip), a pointwise conv, average and global pooling,
Flatten, Gemm and Softmax; input "image" is 1x3x32x32 float32, output "probs" is 1x10.
"""

from pathlib import Path

import numpy as np
import onnx

from applec.testing import cnn

HERE = Path(__file__).parent

if __name__ == "__main__":
    onnx.save(cnn(seed=0, batch=1), HERE / "cnn.onnx")
    image = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(HERE / "image.npy", image)
    print(f"wrote {HERE / 'cnn.onnx'} and {HERE / 'image.npy'}")
