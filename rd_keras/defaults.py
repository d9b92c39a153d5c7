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
    "train_subset": 0,  # 0 = all; else n examples, a class-stratified random choice (data.split_seed)
    "eval_subset": 0,  # likewise, of the evaluation split
    # > 0: evaluate on this fraction of the train examples (class-stratified, random by data.split_seed),
    # the test split only once, at the end
    "validation_split": 0.0,
    "split_seed": 0,  # which examples the subsets and the validation split hold: the same for every train.seed
    "cache": True,  # in memory, after decoding: turn off for ImageNet-sized data
    "shuffle_buffer": 10_000,  # tfds (streamed) data; in-memory data is shuffled as a full permutation
    "seed": 0,
    "mean": (),  # empty = known constants for `name`, else 0.5 per channel
    "std": (),
    "normalization": "dataset",  # "dataset" (mean/std above) | "caffe" | "torch": as the pretrained teacher
}


# Per-channel mean and std of the training images / 255 (the published values; the 50,000 images of the
# JPEG copy measure 0.4868, 0.4822, 0.4414 / 0.2451, 0.2425, 0.2605: JPEG's colour subsampling, no matter).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
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
INT8_IO = "int8"  # input/output type of the full-integer models ("int8" or "uint8")
QAT_LEARNING_RATE = 1e-3  # SGD learning rate of the quantisation-aware fine-tune
QAT_MOMENTUM = 0.9
