"""The channel count of a run's images, taken from the trained net the run starts from.

A fine-tune (`train.mode="transfer"`) and RD from a pretrained teacher feed their images to a net trained
already, whose input says how many channels the images must have. Folder and synthetic data can give any
count: folder images are decoded to it (grayscale PNGs read as one channel for a 1-channel net and made RGB
for an RGB net, RGB images made grayscale for a 1-channel net), synthetic images are made with it. `adopt`
sets `config.data.channels` from the net before the run checks or writes anything, so config.json records
it and the export, QAT and a resumed run read the same images. IDX images have one channel: a net that
takes another count is refused here, naming both. tfds data keep their own count, known only once the data
set is opened; a mismatch there is refused when the net is rebuilt (`transfer.rebuild`, `teacher.load`).

Only files are read (a .keras archive's config.json, a run's config.json), no TensorFlow: `adopt` may run
before the distribution strategy exists.
"""

import json
import os
import zipfile

from rd_keras import pretrained, transfer
from rd_keras.errors import ConfigError, TransferError
from rd_keras.workdir import CONFIG_FILE, RESNET_FILE, saved_model_file

ANY_COUNT_SOURCES = ("folder", "synthetic")  # data sources that give images of any channel count


def keras_file_channels(path):
    """The channel count of the input of the model saved in the .keras file `path`, or None if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
        (shape,) = [layer["config"]["batch_shape"] for layer in layers if layer["class_name"] == "InputLayer"]
        return int(shape[-1])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None


def _run_channels(workdir):
    """The channel count of the images a run of this project trained on (its config.json), or None."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            return int(json.load(f)["dataset"]["image_shape"][-1])
    except (OSError, KeyError, TypeError, ValueError, IndexError):
        return None


def _teacher_channels(path):
    """As `teacher.resolve` finds the teacher at `path`: a keras.applications name, a .keras file, a workdir
    (its resnet.keras, else its checkpoints) or a checkpoint prefix `W/checkpoints/ckpt-N`. None for no path:
    the two-phase recipe trains its teacher on this same data."""
    if not path:
        return None
    if pretrained.is_application(path):
        return 3
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        resnet = saved_model_file(path, (RESNET_FILE,))
        return keras_file_channels(resnet) if resnet else _run_channels(path)
    if path.endswith(".keras"):
        return keras_file_channels(path)
    return _run_channels(os.path.dirname(os.path.dirname(path)))


def _transfer_channels(path):
    if pretrained.is_application(path):
        return 3
    try:
        return keras_file_channels(transfer.resolve(path).path)
    except TransferError:
        return None  # the run reports it, naming the path, when it loads the source


def source_net(config):
    """`(key, channels)`: the config key naming the trained net the run starts from, as `key='value'`, and
    the channel count its input takes; `(None, None)` for a run from scratch or a net unreadable here."""
    t = config.train
    if t.mode == "transfer":
        path = config.transfer["from"]
        return f"config.transfer.from={path!r}", _transfer_channels(path)
    if t.mode == "distill" and config.teacher.mode == "pretrained":
        path = config.teacher.path
        return f"config.teacher.path={path!r}", _teacher_channels(path)
    return None, None


def adopt(config):
    """Sets `config.data.channels` to the channel count of the net the run starts from, where the data can
    give it; raises ConfigError naming both when IDX data cannot. A no-op for a run from scratch."""
    key, channels = source_net(config)
    if channels is None:
        return
    data = config.data
    if data.source in ANY_COUNT_SOURCES:
        data.channels = channels
    elif data.source == "idx" and channels != 1:
        raise ConfigError(f"{key} takes {channels}-channel images, but IDX images (config.data.source='idx') "
                          f"have 1 channel. A folder of images (config.data.source='folder') is read with the "
                          f"net's channel count.")
