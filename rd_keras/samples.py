"""The fixed sample of images a finished workdir keeps, so that its export needs no data directory.

At the end of training, `store(config, workdir)` writes `W/samples.npz` (`rd_keras.workdir` owns the file):
`defaults.CALIBRATION_EXAMPLES` images of the train split (they calibrate the int8 `.tflite`) and
`defaults.EVAL_EXAMPLES` images of the test split with their labels (every accuracy of the export report),
as `data.raw_examples` chooses and returns them (its seeded class-stratified choice, uint8, after the
evaluation resize), and the class names. The export takes its images from there whenever the sample holds
as many as it asks for (`examples`: the first n of the sample), so a workdir copied to a machine without
the data exports the same files and the same report; asked for more, or for a workdir trained before
samples.npz existed, it reads the data directory as it always did.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rd_keras import data, data_sources, defaults
from rd_keras import workdir as wd
from rd_keras.errors import DataError

# Class names of the datasets whose files carry none (IDX), in label order.
KNOWN_LABELS = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "mnist": tuple(str(digit) for digit in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def label_names(config, num_classes):
    """The name of each of the run's `num_classes` labels: the known names of `data.name`, the class
    directories of a folder source, else the label numbers; `data.classes` picks and reorders them as the
    data pipeline relabels."""
    cfg = config.data
    names = KNOWN_LABELS.get(cfg.name) if cfg.source in ("idx", "tfds") else None
    if cfg.source == "folder":
        try:
            names = data_sources._folder_classes(cfg.data_dir)  # the one rule: sorted class directories
        except (DataError, OSError):
            names = None
    if names is not None and cfg.classes:
        names = [names[c] if c < len(names) else str(c) for c in cfg.classes]
    if names is None or len(names) != num_classes:
        names = [str(label) for label in range(num_classes)]
    return [str(name) for name in names]


def store(config, workdir, num_classes):
    """Writes `W/samples.npz` from the data directory, unless the workdir already holds one (a rerun of a
    finished run: `data.raw_examples`' choice is seeded, so it would store the same images)."""
    if wd.read_samples(workdir) is not None:
        return
    calibration, _ = data.raw_examples(config, "train", defaults.CALIBRATION_EXAMPLES)
    images, labels = data.raw_examples(config, "test", defaults.EVAL_EXAMPLES)
    wd.write_samples(workdir, calibration_images=calibration, test_images=images, test_labels=labels,
                     label_names=np.asarray(label_names(config, num_classes)))


@dataclasses.dataclass(frozen=True)
class Examples:
    """The images an export uses, and where they came from (`source`, printed and reported)."""

    test_images: np.ndarray
    test_labels: np.ndarray
    calibration_images: np.ndarray  # empty when none were asked for
    label_names: list
    source: str
    stored: bool  # from W/samples.npz


def examples(config, workdir, *, test_examples, calibration_examples, num_classes):
    """`test_examples` test images (with labels) and `calibration_examples` train images (0: none): the
    first of `W/samples.npz` when it holds that many, else `data.raw_examples` from the data directory."""
    stored = wd.read_samples(workdir)
    if stored is not None and len(stored["test_images"]) >= test_examples \
            and len(stored["calibration_images"]) >= calibration_examples:
        return Examples(stored["test_images"][:test_examples], stored["test_labels"][:test_examples],
                        stored["calibration_images"][:calibration_examples],
                        [str(name) for name in stored["label_names"]], wd.samples_path(workdir), True)
    try:
        images, labels = data.raw_examples(config, "test", test_examples)
        calibration = data.raw_examples(config, "train", calibration_examples)[0] if calibration_examples \
            else np.zeros((0, *images.shape[1:]), np.uint8)
    except DataError as e:
        if stored is None:
            raise
        raise DataError(f"{e}\n{wd.samples_path(workdir)} holds {len(stored['test_images'])} test and "
                        f"{len(stored['calibration_images'])} calibration images; asked for {test_examples} "
                        f"and {calibration_examples}. Ask for at most those to export without the data "
                        "directory.") from None
    names = [str(n) for n in stored["label_names"]] if stored is not None else label_names(config, num_classes)
    return Examples(images, labels, calibration, names, f"data directory {config.data.data_dir}", False)
