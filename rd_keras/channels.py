"""The channel count of a run's images, taken from the trained net the run starts from.

A fine-tune (`train.mode="transfer"`) and RD from a pretrained teacher feed their images to a net trained
already, whose input says how many channels the images must have. Folder and synthetic data can give any
count: folder images are decoded to it (grayscale PNGs read as one channel for a 1-channel net and made RGB
for an RGB net, RGB images made grayscale for a 1-channel net), synthetic images are made with it. `adopt`
sets `config.data.channels` from the net before the run checks or writes anything, so config.json records
it and the export, QAT and a resumed run read the same images. IDX images have one channel: a net that
takes another count is refused here, naming both. tfds data keep their own count, known only once the data
set is opened; a mismatch there is refused when the net is rebuilt (`transfer.rebuild`, `teacher.load`).

Only files are read (a .keras archive's config.json, a run's config.json; `sources.channels` finds the
source as a run would), no TensorFlow op runs: `adopt` may run before the distribution strategy exists.
"""

from rd_keras import sources
from rd_keras.errors import ConfigError

ANY_COUNT_SOURCES = ("folder", "synthetic")  # data sources that give images of any channel count


def source_net(config):
    """`(key, channels)`: the config key naming the trained net the run starts from, as `key='value'`, and
    the channel count its input takes; `(None, None)` for a run from scratch or a net unreadable here."""
    t = config.train
    if t.mode == "transfer":
        path = config.transfer["from"]
        return f"config.transfer.from={path!r}", sources.channels(path, sources.TRANSFER)
    if t.mode == "distill" and config.teacher.mode == "pretrained":
        path = config.teacher.path
        # None for no path: the two-phase recipe trains its teacher on this same data.
        return f"config.teacher.path={path!r}", sources.channels(path, sources.TEACHER)
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
