"""Checkpoints that follow the tf.distribute multi-worker rules (only the chief writes into the workdir),
and the chief/worker helpers. Paths inside the workdir, config.json and the atomic writer are in
`rd_keras.workdir`.

tf.train.CheckpointManager writes its files aside and then rewrites its `checkpoint` index atomically, so a
kill leaves the previous checkpoint readable.
"""

import hashlib
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from rd_keras import workdir as wd


def weights_digest(models) -> str:
    """sha256 of the weights of `models` in order: equal digests mean bitwise-equal weights (used to show
    that all workers of a distributed run end with the same model)."""
    digest = hashlib.sha256()
    for model in models:
        for weight in model.weights:
            digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def task_name(strategy) -> str:
    """'chief', 'worker:1', ... in a multi-worker cluster; 'single worker' otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "single worker"
    return f"{resolver.task_type}:{resolver.task_id}"


def is_chief(strategy) -> bool:
    """True on the one worker that writes the workdir: the single worker, `chief`, or worker 0 when the
    cluster has no chief (the rule of the tf.distribute multi-worker guide)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


class Checkpointer:
    """tf.train.CheckpointManager over `objects`. The chief writes `workdir/checkpoints`; other workers
    must take part in every save (it is a collective under MultiWorkerMirroredStrategy) but write to a
    temporary directory, removed by `close()`. All workers restore from the chief's directory."""

    def __init__(self, workdir: str, objects: dict, *, chief: bool, max_to_keep: int):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.directory = wd.checkpoint_dir(workdir)
        self._scratch = None if chief else tempfile.mkdtemp(prefix="rd_keras_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self._scratch or self.directory,
                                                  max_to_keep=max_to_keep)

    def latest(self):
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self):
        """Restores the newest checkpoint if any; returns its path or None."""
        path = self.latest()
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)

    def close(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
