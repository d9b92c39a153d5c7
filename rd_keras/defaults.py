"""Default numbers that more than one place needs, one owner each. rd_keras/configs/common.py builds every run's
config from these; the export command line, QAT and the bench read the same values here.

A number a single config owns (epochs, blend schedule, ...) stays in rd_keras/configs/common.py with its comment.
"""

import ml_collections
from ml_collections import config_dict

# --- config.data: every field with its default (native-size Fashion-MNIST from the Debian package) ---------
DATA = {
    "source": "idx",
    "name": "fashion_mnist",
    "data_dir": "/usr/share/datasets/fashion-mnist",
    "manual_dir": "",  # tfds manual downloads (imagenet2012)
    "download": False,  # tfds only: allow download_and_prepare
    "image_size": None,  # None keeps the native size (an int placeholder in the ConfigDict)
    # synthetic images; folder images are decoded to this many channels. A run from a trained net (transfer,
    # pretrained teacher) takes the net's count instead (rd_keras/channels.py)
    "channels": 3,
    "num_classes": 10,  # synthetic and idx; tfds and folder know their own
    "classes": (),  # idx, folder, synthetic: keep only these labels, renumbered 0.. in this order; () = all
    "synthetic_examples": 512,  # train split; the test split gets a fifth as many
    "batch_size": 128,  # global, across replicas
    "augment": "cifar",
    "train_subset": 0,  # 0 = all; else the first n examples
    "eval_subset": 0,
    "validation_split": 0.0,  # > 0: evaluate on the last fraction of the train examples, test only at the end
    "cache": True,  # in memory, after decoding: turn off for ImageNet-sized data
    "shuffle_buffer": 10_000,
    "seed": 0,
    "mean": (),  # empty = known constants for `name`, else 0.5 per channel
    "std": (),
    "normalization": "dataset",  # "dataset" (mean/std above) | "caffe" | "torch": as the pretrained teacher
}


def data_config():
    """A fresh `config.data` ConfigDict with the defaults above."""
    return ml_collections.ConfigDict({**DATA, "image_size": config_dict.placeholder(int)})


# --- the trainer's optimizer (config.train), also what `bench train-step` times ------------------------------
LR = 0.1  # SGD learning rate for the global batch size data.batch_size
MOMENTUM = 0.9
NESTEROV = True
WEIGHT_DECAY = 5e-4  # L2: loss += weight_decay/2 * sum ||kernel||^2 (as PyTorch SGD weight_decay)

# --- the teacher (config.teacher.mode; ResidualDistiller's teacher_mode) -----------------------------------
TEACHER_MODES = ("joint", "pretrained")  # trained alongside its student, or loaded and frozen

# --- export: config.export and `python -m rd_keras.export` -----------------------------------------------
MODEL_NAME = "plain"  # TF Serving model name (directory under export/saved_model/)
EVAL_EXAMPLES = 1000  # test images for the accuracy report of every artefact
CALIBRATION_EXAMPLES = 256  # training images that calibrate the int8 TFLite model
INT8_IO = "int8"  # output type of the full-integer models ("int8" or "uint8"); their input is uint8 pixels
QAT_LEARNING_RATE = 1e-3  # SGD learning rate of the quantisation-aware fine-tune
QAT_MOMENTUM = 0.9
