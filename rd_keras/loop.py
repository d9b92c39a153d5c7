"""The epoch loop of `train_lib.run`: steps, progress bar, logs, evaluation, checkpoints, final artefacts.

Loss values stay on the device between log points; every `train.log_every_steps` steps (and before every
checkpoint) they are fetched together, checked for NaN/Inf, and averaged into TensorBoard and the progress
bar. No checkpoint is written before that check (nor with non-finite weights), so the newest checkpoint
is always a good one.

A run resumes from the newest checkpoint at the exact batch it reached: the epoch's pass over the data is
rebuilt and its consumed batches skipped (`data.TrainPasses`), and the metrics records are trimmed back to it.
SIGTERM stops the run after the current step, with a checkpoint; in a multi-worker run the workers agree
on stopping at a log point (a collective), so that they all save the same step and none waits for the
others forever.
"""

import json
import math
import signal
import sys
import threading

import numpy as np
import tensorflow as tf
import tqdm

from rd_keras import checkpointing, steps
from rd_keras import workdir as wd
from rd_keras.errors import NonFiniteLossError, WorkdirError  # noqa: F401



class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (so it can checkpoint, then exit)."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _mean(values):
    return sum(values) / len(values)


class TrainLoop:
    """Runs `setup` (see `train_lib.build_setup`) from the newest checkpoint in `workdir` to the end."""

    def __init__(self, config, workdir, setup, *, strategy, chief, steps_per_epoch, num_eval_examples,
                 eval_split="test"):
        self.config, self.workdir, self.setup, self.chief = config, workdir, setup, chief
        self.task = checkpointing.task_name(strategy)
        # Host-side decisions all workers must share go through a collective; one worker decides alone.
        self._cross_sum = steps.build_cross_replica_sum(strategy) if isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy) else None
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = config.train.epochs * steps_per_epoch
        self.num_eval_examples, self.eval_split = num_eval_examples, eval_split
        self._test_data = None
        self._pending = []  # (step, {term: device scalar}) not yet fetched
        self._epoch_terms = {}  # term -> host values since the last evaluation
        self._skipped = 0
        self._last_saved = None
        self._bar = None

    def _print(self, message):
        if self.chief:
            tqdm.tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def _writer(self, name):
        if not self.chief:
            return tf.summary.create_noop_writer()
        return tf.summary.create_file_writer(wd.tensorboard_dir(self.workdir, name))

    # ------------------------------------------------------------------ losses and checkpoints

    def _flush(self):
        """Fetches the pending step outputs, applies the NaN policy, logs their means."""
        if not self._pending:
            return
        fetched = [(step, {k: float(v) for k, v in out.items()}) for step, out in self._pending]
        self._pending = []
        interval = {}
        for step, values in fetched:
            # Gradient norms are diagnostics, measured after the update: they never trigger the NaN policy.
            bad = sorted(k for k, v in values.items() if not math.isfinite(v) and not k.startswith("grad_norm/"))
            if values.pop("skipped", 0.0) > 0:
                self._skipped += 1
                self._print(f"step {step}: update skipped, non-finite {bad or 'gradients'} "
                            f"(train.nan_policy='skip'; {self._skipped} skipped so far)")
                continue
            if bad:
                terms = ", ".join(f"{k}={values[k]}" for k in bad)
                raise NonFiniteLossError(
                    f"Non-finite loss at step {step}: {terms}. Stopped (train.nan_policy='stop'); the "
                    f"newest checkpoint, {self._checkpointer.latest() or 'none yet'}, predates it. Lower "
                    "train.lr or set train.nan_policy='skip'.")
            for k, v in values.items():
                interval.setdefault(k, []).append(v)
                self._epoch_terms.setdefault(k, []).append(v)
        if not interval:
            return
        means = {k: _mean(v) for k, v in interval.items()}
        with self._train_writer.as_default(step=fetched[-1][0] + 1):
            for k, v in means.items():
                tf.summary.scalar(k, v)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{means['total']:.4f}", acc=f"{means['train_acc']:.3f}",
                                  refresh=False)

    def _save(self, step):
        self._flush()
        if step == self._last_saved:
            return
        # Finite losses may still come with an overflowing update: never checkpoint such weights.
        bad = [v.path for model in self.setup.trained.values() for v in model.weights
               if not np.isfinite(v.numpy()).all()]
        if bad:
            raise NonFiniteLossError(
                f"Non-finite weights at step {step}: {', '.join(bad[:3])}{' ...' * (len(bad) > 3)}. "
                f"Stopped before checkpointing them (train.nan_policy={self.config.train.nan_policy!r}); "
                f"the newest checkpoint is {self._checkpointer.latest() or 'none yet'}. Lower train.lr.")
        self._checkpointer.save(step)
        self._last_saved = step

    def _check_same_restore(self, step, restored):
        """All workers must continue from the same step: each one restores from the chief's directory."""
        if self._cross_sum is None:
            return
        count, total, squares = self._cross_sum(tf.constant([1.0, step, step * step], tf.float64)).numpy()
        if count * squares != total * total:  # equal iff every replica has the same step
            source = restored or "no checkpoint"
            raise WorkdirError(
                f"The workers restored different steps ({self.task}: step {step}, from {source}). Every "
                f"worker restores from {self._checkpointer.directory}: put the workdir on a filesystem all "
                "workers share.")

    def _stop_requested(self, sigterm, step):
        """Whether to stop after `step` for a SIGTERM; with several workers, once any of them got one."""
        if self._cross_sum is None:
            return sigterm.requested
        if step % self.config.train.log_every_steps:
            return False
        return self._cross_sum(tf.constant([float(sigterm.requested)], tf.float64)).numpy()[0] > 0

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, eval_data, step):
        """One metrics record: `acc` and `loss` of the delivered net (the plain one when distilling), under
        its role (`plain_acc` / `resnet_acc`), plus `teacher_acc` and `hybrid_acc` when distilling."""
        result = steps.evaluate(self.setup.eval_step, eval_data)
        role = "plain" if "plain" in self.setup.trained else "resnet"
        record = {"step": step, "epoch": step // self.steps_per_epoch, "acc": result["acc"],
                  "loss": result["loss"], f"{role}_acc": result["acc"]}
        if "teacher_acc" in result:
            record.update(teacher_acc=result["teacher_acc"], hybrid_acc=result["hybrid_acc"])
        if step == self.total_steps and self._test_data is not None:
            # Runs that choose on a validation split see the test set once, at the very end.
            test = steps.evaluate(self.setup.eval_step, self._test_data)
            record.update({f"test_{k}": v for k, v in test.items()})
        return record

    def _log_eval(self, record):
        with self._eval_writer.as_default(step=record["step"]):
            for k, v in record.items():
                if k.endswith("hybrid_acc"):
                    for i, acc in enumerate(v, start=1):
                        tf.summary.scalar(f"{k}_stage{i}", acc)
                elif k not in ("step", "epoch"):
                    tf.summary.scalar(k, v)
        train_means = {k: _mean(v) for k, v in self._epoch_terms.items()}
        self._epoch_terms = {}
        if self.chief:
            with open(wd.metrics_path(self.workdir), "a") as f:
                f.write(json.dumps({**record, **train_means}, sort_keys=True) + "\n")
        accs = [f"{k}=[{', '.join(f'{a:.4f}' for a in v)}]" if isinstance(v, list) else f"{k}={v:.4f}"
                for k, v in record.items() if k.endswith("_acc")]
        self._print(f"eval at step {record['step']} (epoch {record['epoch']}): {', '.join(accs)}, "
                    f"loss={record['loss']:.4f}")

    # ------------------------------------------------------------------ main loop

    def run(self, train_data, eval_data, test_data=None):
        """Trains to the end; returns the final evaluation record, or None when `train.steps_per_run`
        stopped this invocation early (after a checkpoint). SIGTERM checkpoints, then exits with 143.

        `train_data(step)` gives the distributed batches from global step `step` to the end of its epoch;
        `eval_data` is a distributed dataset, and so is `test_data` (when `eval_data` is a validation split),
        evaluated only at the last step into `test_acc`, `test_loss` (and `test_teacher_acc`,
        `test_hybrid_acc`)."""
        self._test_data = test_data
        self._checkpointer = checkpointing.Checkpointer(self.workdir, self.setup.checkpoint_objects,
                                                        chief=self.chief,
                                                        max_to_keep=self.config.train.keep_checkpoints)
        self._train_writer, self._eval_writer = self._writer("train"), self._writer("eval")
        try:
            restored = self._checkpointer.restore_latest()
            step = int(self.setup.step.numpy())
            self._check_same_restore(step, restored)
            if restored:
                self._last_saved = step
                self._print(f"resumed from step {step} of {self.total_steps} "
                            f"({step // self.steps_per_epoch} epochs done, "
                            f"{step % self.steps_per_epoch} steps into the next): {restored}")
            if self.chief and wd.trim_metrics(self.workdir, step):
                self._print(f"{wd.METRICS_FILE}: dropped the records after step {step}, "
                            "written after the restored checkpoint")
            with _SigtermFlag() as sigterm:
                return self._train(step, train_data, eval_data, sigterm)
        finally:
            self._checkpointer.close()
            self._train_writer.close()
            self._eval_writer.close()

    def _train(self, step, train_data, eval_data, sigterm):
        t, spe = self.config.train, self.steps_per_epoch
        run_end = min(step + t.steps_per_run, self.total_steps) if t.steps_per_run else self.total_steps
        record = None
        stop = False
        while step < run_end and not stop:
            iterator = iter(train_data(step))  # the rest of this epoch, exactly as an uninterrupted run
            self._bar = tqdm.tqdm(total=spe, initial=step % spe, desc=f"epoch {step // spe + 1}/{t.epochs}",
                                  unit="step", disable=not (self.chief and t.progress), file=sys.stderr)
            with self._bar:
                while step < run_end:
                    diagnose = t.grad_norms and steps.is_diagnostic_step(step, t.log_every_steps)
                    self._pending.append((step, self.setup.train_step(iterator, diagnose=diagnose)))
                    step += 1
                    self._bar.update(1)
                    if step % t.log_every_steps == 0:
                        self._flush()
                    if step % t.checkpoint_every_steps == 0:
                        self._save(step)
                    stop = self._stop_requested(sigterm, step)
                    if stop or step % spe == 0:
                        break
                self._flush()
            self._bar = None
            if step % spe == 0:
                self.setup.epoch.assign(step // spe)
                record = self._evaluate(eval_data, step)
                self._log_eval(record)
                self._save(step)
            if stop:
                self._save(step)
                self._print(f"SIGTERM: checkpoint saved at step {step}; rerun the same command to resume.")
                raise SystemExit(128 + signal.SIGTERM)
        if step < self.total_steps:
            self._save(step)
            self._print(f"stopped at step {step} of {self.total_steps} (train.steps_per_run="
                        f"{t.steps_per_run}); checkpoint saved, rerun the same command to continue.")
            return None
        if record is None:  # resumed a finished run: evaluate again for the summary
            record = self._evaluate(eval_data, step)
        # Every worker says what it ended with: in a distributed run all digests must be equal.
        print(f"final weights sha256={checkpointing.weights_digest(self.setup.trained.values())} "
              f"({self.task})", flush=True)
        self._save_artefacts()
        self._print_summary(record)
        return record

    def _save_artefacts(self):
        if not self.chief:
            return
        for role, model in self.setup.trained.items():
            path = wd.plain_path(self.workdir) if role == "plain" else wd.resnet_path(self.workdir)
            wd.save_model_atomic(model, path)
            self._print(f"saved {path} ({model.name}, {model.count_params():,} params)")

    def _print_summary(self, record):
        distilled = "hybrid_acc" in record
        rows = [(f"plain ({self.setup.trained['plain'].name})", record["plain_acc"])] if distilled else [
            (f"{role} ({model.name})", record["acc"]) for role, model in self.setup.trained.items()]
        if distilled:
            frozen = "" if "resnet" in self.setup.trained else ", pretrained, frozen"
            rows.append((f"teacher ({self.setup.teacher.name}{frozen})", record["teacher_acc"]))
            rows += [(f"hybrid {i} (plain up to {point}, then teacher)", acc)
                     for i, (point, acc) in enumerate(zip(self.setup.hybrid_points, record["hybrid_acc"]), start=1)]
        if "test_acc" in record:
            rows.append(("plain on the test split" if distilled else "on the test split", record["test_acc"]))
        width = max(len(name) for name, _ in rows)
        lines = [f"Final evaluation at step {record['step']} on {self.num_eval_examples} {self.eval_split} "
                 "examples:",
                 f"  {'model':<{width}}  accuracy", *(f"  {name:<{width}}  {acc:.4f}" for name, acc in rows),
                 f"  {'eval loss (CE)':<{width}}  {record['loss']:.4f}"]
        self._print("\n".join(lines))
        self._print(json.dumps({"final": record}, sort_keys=True))
