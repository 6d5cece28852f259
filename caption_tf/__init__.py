"""caption_tf: attention image captioning on TensorFlow/Keras.

The model is in `models/` (`decoder.py`: the decoder, its loss and train step;
`attention.py`; `decoding.py`: greedy and beam search); `training/trainer.py`
runs training top to bottom.

Imports flow one way (checked by tests/test_architecture.py): `config.py` and
`files.py` -> `data/` -> `features/` -> `models/` -> `run_folder.py` ->
`training/` -> `evaluation/` -> `cli.py`.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the progress bars; keep errors.
# train.py / evaluate.py hide the rest of it and show it all with --verbose (caption_tf.console).
TF_LOG_LEVEL_FROM_USER = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
