"""train.py on several machines: two worker processes on 127.0.0.1 form one MultiWorkerMirroredStrategy
cluster through TF_CONFIG, as two hosts would (docs/reliability.md, "Several machines").

Every worker prints `final weights sha256=...` at the end of training; equal digests mean bitwise-equal
weights, so the workers are compared without the non-chief writing any file.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import pytest
import tensorflow as tf

from rd_keras import checkpointing
from rd_keras import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
# The fashion_mnist smoke config on 256 synthetic 16x16 images: 8 steps per epoch, 2 epochs; each worker
# gets half of every global batch of 32 (auto-sharding by data).
SYNTHETIC = ["--config.data.source=synthetic", "--config.data.name=synthetic", "--config.data.image_size=16",
             "--config.data.synthetic_examples=256", "--config.data.train_subset=0",
             "--config.data.eval_subset=0", "--config.train.progress=False",
             "--config.train.checkpoint_every_steps=3"]
# The end-of-training export, kept small: the SavedModel alone.
EXPORT = ["--config.export.enabled=True", "--config.export.formats=saved_model",
          "--config.export.eval_examples=32"]


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_cluster(workdirs, tmpdirs, flags):
    """Starts one train.py per workdir as the workers of one cluster (worker 0 is the chief)."""
    cluster = {"worker": [f"{HOST}:{port}" for port in free_ports(len(workdirs))]}
    procs = []
    for index, (workdir, tmpdir) in enumerate(zip(workdirs, tmpdirs)):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": tmpdir,
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/fashion_mnist.py:smoke",
               f"--workdir={workdir}", *SYNTHETIC, *flags]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs, timeout=420):
    """[(returncode, stdout, stderr)] of every worker, in order."""
    try:
        # A worker left alone waits for its peer forever: the timeout ends such a hang.
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def digests(results):
    return [re.search(r"^final weights sha256=(\w+) ", out, re.MULTILINE).group(1) for _, out, _ in results]


@pytest.mark.slow
def test_two_workers_train_as_one_and_only_the_chief_writes(tmp_path):
    chief_dir, worker_dir = str(tmp_path / "chief"), str(tmp_path / "worker1")
    tmpdirs = [str(tmp_path / "tmp0"), str(tmp_path / "tmp1")]
    for d in tmpdirs:
        os.makedirs(d)

    # Each worker has its own --workdir: the non-chief must leave its own untouched. The chief exports.
    first = finish(start_cluster([chief_dir, worker_dir], tmpdirs, EXPORT))
    for code, out, err in first:
        assert code == 0, err[-3000:]
    assert not os.path.exists(worker_dir)
    # The non-chief's scratch checkpoints (a save is a collective it must join) are gone.
    assert not [n for n in os.listdir(tmpdirs[1]) if n.startswith("rd_keras_worker_ckpt_")]
    with open(os.path.join(chief_dir, wd.CONFIG_FILE)) as f:
        run = json.load(f)["run"]
    assert run["num_replicas"] == 2 and run["strategy"] == "CollectiveAllReduceStrategy"  # = MultiWorkerMirrored
    for name in ("checkpoints/ckpt-16.index", "tensorboard/train", "metrics.jsonl",
                 "export/saved_model/plain/1/saved_model.pb"):
        assert os.path.exists(os.path.join(chief_dir, name)), name
    # The workers end with the same weights, and the chief saved them.
    chief_digest, worker_digest = digests(first)
    assert chief_digest == worker_digest
    saved = [keras.saving.load_model(os.path.join(chief_dir, name), compile=False)
             for name in (wd.PLAIN_FILE, wd.RESNET_FILE)]
    assert checkpointing.weights_digest(saved) == chief_digest

    # Rerunning resumes from the chief's directory, which this non-chief cannot see: it would restore
    # nothing while the chief restores step 16. Every worker refuses, naming the cause.
    second = finish(start_cluster([chief_dir, worker_dir], tmpdirs, []))
    for code, out, err in second:
        assert code == 1 and "error: The workers restored different steps" in err, err[-3000:]
    assert not os.path.exists(worker_dir)



@pytest.mark.slow
def test_sigterm_to_one_worker_stops_all_at_the_same_checkpointed_step(tmp_path):
    """Preemption may reach one worker only; the workers agree at the next log point (a collective), so
    they all save and exit together instead of one leaving the others blocked in a collective."""
    workdir = str(tmp_path / "w")
    tmpdirs = [str(tmp_path / "tmp0"), str(tmp_path / "tmp1")]
    for d in tmpdirs:
        os.makedirs(d)
    procs = start_cluster([workdir, workdir], tmpdirs,
                          ["--config.train.epochs=50", "--config.train.checkpoint_every_steps=10000"])
    try:
        while not os.path.exists(os.path.join(workdir, "checkpoints", "checkpoint")):  # training under way
            assert all(p.poll() is None for p in procs), "a worker ended before the signal"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # the non-chief only
    finally:
        results = finish(procs)
    for code, out, err in results:
        assert code == 128 + signal.SIGTERM, err[-3000:]
    step = int(re.search(r"SIGTERM: checkpoint saved at step (\d+)", results[0][1]).group(1))
    assert step % 4 == 0  # a log point of the smoke config (train.log_every_steps=4)
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith(f"ckpt-{step}")
