"""rd_keras.channels: a run's images take the channel count of the trained net it starts from."""

import json
import os

import pytest

from rd_keras import architectures, channels
from rd_keras import workdir as wd
from rd_keras.configs import fashion_mnist
from rd_keras.errors import ConfigError


def config_for(mode, path, source="folder"):
    config = fashion_mnist.get_config("smoke")
    config.data.source = source
    config.train.mode = mode
    if mode == "transfer":
        config.transfer["from"] = path
    else:
        config.teacher.update(mode="pretrained", path=path)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`saved`: a workdir with the resnet.keras of 1-channel images; `unfinished`: a run with checkpoints and a
    config.json only, of 1-channel images."""
    root = tmp_path_factory.mktemp("runs")
    saved, unfinished = root / "saved", root / "unfinished"
    net = architectures.build("resnet8", input_shape=(16, 16, 1), width=0.25)
    saved.mkdir()
    wd.save_model_atomic(net, wd.resnet_path(str(saved)))
    os.makedirs(unfinished / wd.CHECKPOINT_DIR)
    with open(unfinished / wd.CONFIG_FILE, "w") as f:
        json.dump({"dataset": {"image_shape": [28, 28, 1]}}, f)
    return saved, unfinished


def test_every_kind_of_teacher_and_transfer_source_gives_its_channel_count(runs):
    saved, unfinished = runs
    cases = [("distill", saved / wd.RESNET_FILE, 1), ("distill", saved, 1), ("distill", unfinished, 1),
             ("distill", unfinished / wd.CHECKPOINT_DIR / "ckpt-7", 1),
             ("distill", "keras.applications.ResNet50", 3), ("transfer", saved / wd.RESNET_FILE, 1),
             ("transfer", saved, 1), ("transfer", "keras.applications.ResNet101", 3)]
    for mode, path, expected in cases:
        for source in channels.ANY_COUNT_SOURCES:
            config = config_for(mode, str(path), source)
            config.data.channels = 4 - expected  # what the config said: the net's count wins
            channels.adopt(config)
            assert config.data.channels == expected, (mode, path, source)


def test_runs_from_scratch_unreadable_nets_and_tfds_keep_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run's config.json here must not pass for the two-phase recipe's teacher
    (tmp_path / wd.CONFIG_FILE).write_text(json.dumps({"dataset": {"image_shape": [16, 16, 1]}}))
    for config in (fashion_mnist.get_config("smoke"),  # joint teacher: no trained net
                   config_for("distill", ""),  # the two-phase recipe: its teacher learns on this data
                   config_for("transfer", "/no/such/net.keras"),  # reported, naming it, when the run loads it
                   config_for("distill", "keras.applications.ResNet50", source="tfds")):
        config.data.channels = 2
        channels.adopt(config)
        assert config.data.channels == 2


def test_idx_images_for_an_rgb_net_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"config.teacher.path='keras.applications.ResNet50' takes 3-channel "
                                          r"images, but IDX images \(config.data.source='idx'\) have 1 channel"):
        channels.adopt(config_for("distill", "keras.applications.ResNet50", source="idx"))
