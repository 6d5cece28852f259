"""caption_tf: attention image captioning on TensorFlow/Keras.

Data flows one way through the subpackages: data -> features -> models -> training -> evaluation.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the progress bars; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
