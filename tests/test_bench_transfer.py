"""`python -m rd_keras.bench transfer`: flags, the target image folder, and a tiny end-to-end run."""

import gzip
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from rd_keras import bench
from rd_keras.bench import transfer as bench_transfer


def write_idx(root, n_train=400, n_test=200):
    """Fashion-MNIST-style IDX files of random 28x28 images, labels cycling through 0..9."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with open(os.path.join(root, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return str(root)


@pytest.mark.parametrize("flags, message", [
    (["--source_classes=0,1", "--target_classes=1,2"], "must be disjoint"),
    (["--depth=21"], "--depth must be 6n\\+2 .* got 21"),
    (["--runs=plain"], "--runs must include rd .* got 'plain'"),
    (["--target_classes=5"], "at least two distinct labels in 0..9, got '5'"),
    (["--ft_lr=0"], "--ft_lr must be a number > 0, got 0.0"),
])
def test_bad_flags_are_one_line_errors_quoting_the_value(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["transfer", f"--out={tmp_path / 'out'}", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "out")


def test_target_folder_holds_the_chosen_images_as_png(tmp_path):
    data_dir = write_idx(tmp_path / "idx")
    root = str(tmp_path / "target")
    counts = bench_transfer.write_target_folder(root, data_dir, [7, 5], 30, 10)
    assert counts == {"train": 30, "test": 10}
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["0_sneaker", "1_sandal"]
    from rd_keras import data

    images = data.read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"), 3)
    # Labels cycle 0..9, so image 5 is the first sandal and image 7 the first sneaker.
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(root, "train", "1_sandal", "00005.png"))),
                                  images[5])
    assert len(os.listdir(os.path.join(root, "train", "0_sneaker"))) == 15
    assert sum(len(files) for _, _, files in os.walk(os.path.join(root, "test"))) == 10
    with pytest.raises(ValueError, match="holds a target folder of other settings"):
        bench_transfer.write_target_folder(root, data_dir, [7, 5], 31, 10)


@pytest.mark.slow
def test_tiny_transfer_experiment_reports_every_net(tmp_path, capsys):
    data_dir = write_idx(tmp_path / "idx")
    out, result = str(tmp_path / "out"), str(tmp_path / "transfer.json")
    bench.main(["transfer", f"--data_dir={data_dir}", "--depth=8", "--width=0.25", "--epochs=2", "--target_train=64",
                "--target_test=40", "--ft_epochs=2", "--override=data.batch_size=32", f"--out={out}",
                f"--json={result}"])
    with open(result) as f:
        payload = json.load(f)
    rows = {r["net"]: r for r in payload["results"]}
    assert set(rows) == {"resnet", "plain_rd", "plain", "scratch_resnet", "scratch_plain"}
    for row in rows.values():
        assert not row.get("failed") and 0 <= row["target_test_acc"] <= 1 and len(row["target_curve"]) == 2
    # 200 source images of classes 0..4 at batch 32: 6 steps per epoch, evaluated on 100 test images.
    with open(os.path.join(out, "src_rd", "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [6, 12]
    assert payload["budget"]["target_train"] == 64 and payload["budget"]["depth"] == 8
    assert "ResNet (RD run's joint teacher)" in capsys.readouterr().out
