"""`ResidualDistiller`: Residual Distillation behind Keras' `compile()` / `fit()` / `evaluate()`.

    distiller = rd_keras.ResidualDistiller(teacher, student,  # a trained teacher, frozen
                                           blend=rd_keras.BlendSchedule(steps_per_epoch, blend_epochs=20))
    distiller.compile(optimizer=keras.optimizers.SGD(lr_schedule, momentum=0.9))
    distiller.fit(train_ds, validation_data=eval_ds, epochs=30, callbacks=[...])
    distiller.student  # the trained plain net, to save as W/plain.keras and export

`train_step` is the trainer's step (`steps.build_train_step`) in Keras' shape: the objective is
`losses.distill_losses` itself, over the paths of `hybrid.build_paths`, so the two can never disagree. One
update of the student by `optimizer`. The teacher is frozen by default (`teacher_mode="pretrained"`, as in
`keras.distillation.Distiller`); `teacher_mode="joint"` also trains it, on its own CE, by
`teacher_optimizer`. The blend weight m(t) is a schedule of the student optimizer's `iterations`, as the
learning rate is: `BackupAndRestore` and `ModelCheckpoint` save that counter with the optimizer, so a
resumed `fit` continues m(t) and the learning rate where they stopped.

Logs: `loss` (the RD objective, weight decay included), `plain_loss`, `accuracy`, `hybrid_{i}_loss`,
`hybrid_{i}_accuracy`, `kd_{i}` (with kd_alpha > 0), `teacher_loss` and `teacher_accuracy` (joint),
`blend` and `learning_rate` of the step. `evaluate` (and the `val_` logs) report the plain net's `loss`
(its cross-entropy, what the deployed net is judged by) and `accuracy`, `hybrid_{i}_accuracy` and
`teacher_accuracy`. Metrics given to `compile` are computed on the plain net's logits.
"""

import dataclasses
import numbers

import keras
import tensorflow as tf

from rd_keras import hybrid, losses, steps, twins
from rd_keras.defaults import TEACHER_MODES
from rd_keras.errors import in_range, interval



class _Recording:
    """Stands in for a model inside `losses.distill_losses` and keeps what each call returned (keyed by
    its `training` flag): the step reports accuracies of the logits the objective already computed,
    instead of running the nets a second time. Every other attribute is the model's own."""

    def __init__(self, model):
        self.model, self.outputs = model, {}

    def __call__(self, inputs, training=False):
        self.outputs[bool(training)] = self.model(inputs, training=training)
        return self.outputs[bool(training)]

    def __getattr__(self, name):
        return getattr(self.model, name)


def _number(value, name, low=0.0, high=float("inf"), low_open=False):
    if not in_range(value, low, high, kinds=numbers.Real, low_open=low_open):
        raise ValueError(f"`{name}` must be a number in {interval(low, high, low_open)}. "
                         f"Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="rd_keras")
class ResidualDistiller(keras.Model):
    """Trains `student` (a plain net) by Residual Distillation through `teacher` (its ResNet twin).

    Args:
        teacher, student: functional models returning a dict with `logits` whose layers at the hybrid
            points have equal output shapes (`rd_keras.architectures.build`, or `make_plain(teacher)`).
        teacher_mode: "pretrained" (default: the teacher is trained already and stays frozen; this sets
            `teacher.trainable = False`) or "joint" (trained alongside on its own CE, by `teacher_optimizer`).
        hybrid_points: "stages", "every_k_blocks:K" or "b1,b2,..." (see `rd_keras.hybrid`).
        hybrid_entry: "direct" or "rescale" (plain features scaled to the teacher's per-channel RMS).
        blend: m(t), a number or a schedule of the step (`rd_keras.BlendSchedule`).
        kd_alpha, temperature, weight_decay, normalize: as `losses.LossConfig`; `weight_decay` is the L2
            term of the objective (give the optimizers none of their own).
    """

    def __init__(self, teacher, student, *, teacher_mode="pretrained", hybrid_points=hybrid.STAGES,
                 hybrid_entry="direct", blend=1.0, kd_alpha=0.0, temperature=4.0, weight_decay=0.0, normalize=False,
                 name="residual_distiller", **kwargs):
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"`teacher_mode` must be one of {TEACHER_MODES}. Received: "
                             f"teacher_mode={teacher_mode!r}")
        if not callable(blend):
            _number(blend, "blend", 0.0, 1.0)
        _number(kd_alpha, "kd_alpha")
        _number(temperature, "temperature", low_open=True)
        _number(weight_decay, "weight_decay")
        if not isinstance(normalize, bool):
            raise ValueError(f"`normalize` must be True or False. Received: normalize={normalize!r}")
        points = twins.check_pair(teacher, student, hybrid_points)
        if teacher_mode == "joint" and not teacher.trainable_variables:
            raise ValueError(f"teacher_mode='joint' trains the teacher, but {teacher.name!r} has no trainable "
                             f"variables (teacher.trainable=False?). Use teacher_mode='pretrained' to keep "
                             f"it frozen.")
        super().__init__(name=name, **kwargs)
        if teacher_mode == "pretrained":
            teacher.trainable = False
        self.teacher, self.student = teacher, student
        self.teacher_mode, self.hybrid_points, self.blend = teacher_mode, hybrid_points, blend
        self.loss_config = losses.LossConfig(global_batch_size=None, weight_decay=weight_decay,
                                             temperature=temperature, kd_alpha=kd_alpha, normalize=normalize)
        self.paths = hybrid.build_paths(student, teacher, hybrid_points, hybrid_entry)
        self.teacher_optimizer = None
        self._teacher_optimizer_arg = None
        joint, n = teacher_mode == "joint", len(points)
        mean, accuracy = keras.metrics.Mean, keras.metrics.SparseCategoricalAccuracy
        self.train_trackers = {
            "loss": mean(name="loss"), "plain_loss": mean(name="plain_loss"), "accuracy": accuracy(name="accuracy"),
            **{f"hybrid_{i}_loss": mean(name=f"hybrid_{i}_loss") for i in range(1, n + 1)},
            **{f"hybrid_{i}_accuracy": accuracy(name=f"hybrid_{i}_accuracy") for i in range(1, n + 1)},
            **({f"kd_{i}": mean(name=f"kd_{i}") for i in range(1, n + 1)} if kd_alpha > 0 else {}),
            **({"teacher_loss": mean(name="teacher_loss"), "teacher_accuracy": accuracy(name="teacher_accuracy")}
               if joint else {})}
        self.eval_trackers = {
            "loss": mean(name="eval_loss"), "accuracy": accuracy(name="eval_accuracy"),
            **{f"hybrid_{i}_accuracy": accuracy(name=f"eval_hybrid_{i}_accuracy") for i in range(1, n + 1)},
            "teacher_accuracy": accuracy(name="eval_teacher_accuracy")}
        self.built = True

    # ------------------------------------------------------------------------- compile

    def compile(self, optimizer="sgd", teacher_optimizer=None, metrics=None, **kwargs):
        """`optimizer` trains the student; `teacher_optimizer` the teacher in joint mode (default: a fresh
        copy of `optimizer`, with its own slots and step counter). Other arguments as `keras.Model`; there
        is no `loss`: the objective is Residual Distillation's."""
        if kwargs.get("loss") is not None:
            raise ValueError(f"ResidualDistiller's loss is the Residual Distillation objective; do not pass "
                             f"one. Received: loss={kwargs['loss']!r}")
        kwargs.pop("loss", None)
        optimizer = keras.optimizers.get(optimizer)
        if self.teacher_mode == "pretrained":
            if teacher_optimizer is not None:
                raise ValueError(f"teacher_mode='pretrained' keeps the teacher frozen: pass no "
                                 f"teacher_optimizer. Received: teacher_optimizer={teacher_optimizer!r}")
        elif teacher_optimizer is None:
            teacher_optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        else:
            teacher_optimizer = keras.optimizers.get(teacher_optimizer)
            if teacher_optimizer is optimizer:
                raise ValueError("The teacher needs its own optimizer (its own slots and step counter); "
                                 "got the student's optimizer as teacher_optimizer.")
        self._teacher_optimizer_arg = teacher_optimizer
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)
        if (teacher_optimizer is not None and kwargs.get("auto_scale_loss", True)
                and self.dtype_policy.name == "mixed_float16"
                and not isinstance(teacher_optimizer, keras.optimizers.LossScaleOptimizer)):
            # As keras does for `optimizer`: float16 gradients of small losses underflow without it.
            teacher_optimizer = keras.optimizers.LossScaleOptimizer(teacher_optimizer,
                                                                    name="teacher_loss_scale_optimizer")
        self.teacher_optimizer = teacher_optimizer
        # Built here on their own variable lists: keras would otherwise build `optimizer` on every trainable
        # variable, the teacher's included.
        with self.distribute_strategy.scope():
            self.optimizer.build(self.student.trainable_variables)
            if teacher_optimizer is not None:
                teacher_optimizer.build(self.teacher.trainable_variables)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self._teacher_optimizer_arg is not None:
            config["teacher_optimizer"] = keras.saving.serialize_keras_object(self._teacher_optimizer_arg)
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))

    # ------------------------------------------------------------------------- steps

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def _unpack(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if labels is None or sample_weight is not None:
            raise ValueError("ResidualDistiller trains on (images, labels) batches, without sample weights. "
                             f"Received a batch of {len(data) if isinstance(data, tuple) else 1} element(s).")
        return images, labels

    def _blend(self):
        if callable(self.blend):
            return tf.cast(self.blend(self.optimizer.iterations), tf.float32)
        return tf.constant(self.blend, tf.float32)

    def _sync_state(self, models):
        """Averages the BatchNorm moving statistics over replicas, as the trainer does: keras updates each
        replica's copy on its own batch, and without this the copies drift apart."""
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return
        variables = [v for m in models for v in m.non_trainable_variables]
        if variables:
            values = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v) for v in variables])
            for v, value in zip(variables, values):
                v.assign(value)

    def train_step(self, data):
        images, labels = self._unpack(data)
        joint = self.teacher_mode == "joint"
        blend = self._blend()
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)  # this step's, read before apply
        paths = dataclasses.replace(self.paths, taps=_Recording(self.paths.taps),
                                    tails=tuple(_Recording(t) for t in self.paths.tails))
        teacher = _Recording(self.teacher)
        updates = [(self.optimizer, "total", self.student.trainable_variables)]
        if joint:
            updates.append((self.teacher_optimizer, "teacher_total", self.teacher.trainable_variables))
        with tf.GradientTape(persistent=joint) as tape:
            terms = losses.distill_losses(paths, teacher, images, labels, blend=blend, cfg=self.loss_config,
                                          joint=joint)
            objectives = [steps.scale_loss(opt, terms[key]) for opt, key, _ in updates]
        grads = [tape.gradient(obj, variables) for obj, (_, _, variables) in zip(objectives, updates)]
        for g, (opt, _, variables) in zip(grads, updates):
            opt.apply(g, variables)
        self._sync_state([self.student, self.teacher] if joint else [self.student])

        # Terms are each replica's share of the global mean: times the replicas, their mean over replicas
        # (what the synchronised metrics report) is the global mean.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        t = self.train_trackers
        t["loss"].update_state(terms["total"] * replicas)
        t["plain_loss"].update_state(terms["plain_ce"] * replicas)
        t["accuracy"].update_state(labels, paths.taps.outputs[True]["logits"])
        for i, tail in enumerate(paths.tails, start=1):
            t[f"hybrid_{i}_loss"].update_state(terms[f"hybrid_ce_{i}"] * replicas)
            t[f"hybrid_{i}_accuracy"].update_state(labels, tail.outputs[False])
            if f"kd_{i}" in t:
                t[f"kd_{i}"].update_state(terms[f"kd_{i}"] * replicas)
        if joint:
            t["teacher_loss"].update_state(terms["teacher_ce"] * replicas)
            t["teacher_accuracy"].update_state(labels, teacher.outputs[True]["logits"])
        logs = self._logs(t, images, labels, paths.taps.outputs[True]["logits"])
        return {**logs, "blend": blend, "learning_rate": learning_rate}

    def test_step(self, data):
        images, labels = self._unpack(data)
        out = self.paths.taps(images, training=False)
        t = self.eval_trackers
        t["loss"].update_state(losses.cross_entropy(labels, out["logits"]))
        t["accuracy"].update_state(labels, out["logits"])
        found = self.paths.teacher_outputs(self.teacher, images)
        for i, logits in enumerate(self.paths.logits(out, found), start=1):
            t[f"hybrid_{i}_accuracy"].update_state(labels, logits)
        t["teacher_accuracy"].update_state(labels, found["logits"])
        return self._logs(t, images, labels, out["logits"])

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # The compiled metrics judge the plain net's logits, also when keras passes `call`'s whole dict.
        if isinstance(y_pred, dict):
            y_pred = y_pred["logits"]
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def _logs(self, trackers, images, labels, logits):
        """This phase's trackers by their log names, plus the metrics given to `compile` (on the plain
        logits); keras' own `loss` tracker and the other phase's trackers stay out of the logs."""
        ours = {m.name for m in (*self.train_trackers.values(), *self.eval_trackers.values())} | {"loss"}
        logs = {k: v for k, v in self.compute_metrics(images, labels, logits).items() if k not in ours}
        return {**logs, **{name: m.result() for name, m in trackers.items()}}

    # ------------------------------------------------------------------------- serialisation

    def get_config(self):
        blend = self.blend if not callable(self.blend) else keras.saving.serialize_keras_object(self.blend)
        return {"name": self.name, "teacher": keras.saving.serialize_keras_object(self.teacher),
                "student": keras.saving.serialize_keras_object(self.student), "teacher_mode": self.teacher_mode,
                "hybrid_points": self.hybrid_points, "hybrid_entry": self.paths.entry,
                "blend": blend, "kd_alpha": self.loss_config.kd_alpha,
                "temperature": self.loss_config.temperature, "weight_decay": self.loss_config.weight_decay,
                "normalize": self.loss_config.normalize}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        if isinstance(config["blend"], dict):
            config["blend"] = keras.saving.deserialize_keras_object(config["blend"])
        return cls(**config)
