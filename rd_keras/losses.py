"""The loss terms: cross-entropy, KD, weight decay, and the objectives built from them (supervised, the
joint teacher's, and Residual Distillation's).

RD objective of the plain (student) net, per global batch:

    total = CE(y, plain) + m(t) * sum_i [CE(y, hybrid_i) + kd_alpha * T^2 * KL(p_teacher^T || p_hybrid_i^T)]
            + logit_kd_alpha * T^2 * KL(p_teacher^T || p_plain^T) + weight decay of the plain net

The `logit_kd_alpha` term is ordinary knowledge distillation (Hinton et al.) on the plain net's own logits,
at full weight all along; with no hybrid paths (`distill.hybrid_points=none`) it is the KD baseline that RD
is measured against, run by the same trainer.

With `normalize` the cross-entropy part is divided by the number of paths (hybrid paths + the plain one), as
the paper's official code averages its losses; weight decay is not divided.

The hybrid terms are differentiated w.r.t. the plain variables only: they never move the teacher, but their
gradient reaches the plain net's early stages *through* the teacher's later stages. In `joint` mode the
teacher is trained at the same time on its own CE (+ its own weight decay) by its own optimizer.

Per-example losses are averaged with the *global* batch size and weight decay is divided by the number of
replicas (`rd_keras.steps` runs them under `strategy.run`), so that the gradients summed across replicas by
the optimizer equal the single-device gradient of the global batch.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Numbers the losses need. `weight_decay` is the L2 coefficient: penalty = weight_decay/2 *
    sum ||kernel||^2, i.e. a gradient of weight_decay * kernel, as with PyTorch's SGD(weight_decay=...). `global_batch_size=None`
    takes each step's own batch size (per-replica size x replicas), for `fit()`, whose last batch may be
    smaller."""

    global_batch_size: int | None
    weight_decay: float = 0.0
    temperature: float = 4.0
    kd_alpha: float = 0.0
    logit_kd_alpha: float = 0.0
    normalize: bool = False

    def __post_init__(self):
        if self.global_batch_size is not None and (not isinstance(self.global_batch_size, int)
                                                   or self.global_batch_size < 1):
            raise ValueError(f"global_batch_size must be a positive int or None, got {self.global_batch_size!r}.")
        for name in ("weight_decay", "kd_alpha", "logit_kd_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")


def cross_entropy(labels, logits):
    """Per-example softmax cross-entropy, float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32),
                                                          tf.cast(logits, tf.float32))


def kd_loss(teacher_logits, student_logits, temperature):
    """Per-example T^2 * KL(softmax(teacher/T) || softmax(student/T)); T^2 keeps gradient scales T-free."""
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p_t, log_p_s = tf.nn.log_softmax(t), tf.nn.log_softmax(s)
    return temperature ** 2 * tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def l2_penalty(model, weight_decay):
    """weight_decay/2 * sum of squared conv and dense kernels (BN parameters and biases are not decayed)."""
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    if not kernels or weight_decay == 0:
        return tf.constant(0.0)
    return 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in kernels])


def accuracy(labels, logits):
    """Per-example 1.0 where the top logit is the label, else 0.0."""
    predictions = tf.argmax(logits, -1, output_type=tf.int32)
    return tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)), tf.float32)


def supervised_losses(model, images, labels, cfg: LossConfig):
    """Terms of a plain supervised step, each already a per-replica share of the global mean."""
    def mean(per_example):
        return tf.nn.compute_average_loss(per_example, global_batch_size=cfg.global_batch_size)

    logits = model(images, training=True)["logits"]
    terms = {"ce": mean(cross_entropy(labels, logits)),
             "weight_decay": tf.nn.scale_regularization_loss(l2_penalty(model, cfg.weight_decay)),
             "train_acc": mean(accuracy(labels, logits))}
    terms["total"] = terms["ce"] + terms["weight_decay"]
    return terms


def teacher_losses(teacher, images, labels, cfg: LossConfig):
    """A joint teacher's own objective, `teacher_total` = its CE + its weight decay."""
    def mean(per_example):
        return tf.nn.compute_average_loss(per_example, global_batch_size=cfg.global_batch_size)

    terms = {"teacher_ce": mean(cross_entropy(labels, teacher(images, training=True)["logits"])),
             "teacher_weight_decay": tf.nn.scale_regularization_loss(l2_penalty(teacher, cfg.weight_decay))}
    terms["teacher_total"] = terms["teacher_ce"] + terms["teacher_weight_decay"]
    return terms


def distill_losses(paths, teacher, images, labels, *, blend, cfg: LossConfig, joint: bool, kd_weight=1.0):
    """Terms of an RD step: `total` is the plain net's objective, `teacher_total` (joint mode) the teacher's.

    `paths` is a `hybrid.HybridPaths` (possibly with no path); hybrid path i gives `hybrid_ce_{i}` and, when
    kd_alpha > 0, `kd_{i}`; logit_kd_alpha > 0 gives `logit_kd`. With normalize, the KD term on the plain
    logits is not divided: it is not a path's cross-entropy; `kd_weight` (0 or 1, a number or a scalar
    tensor) gates it, as m(t) gates the hybrid terms.
    """
    def mean(per_example):
        return tf.nn.compute_average_loss(per_example, global_batch_size=cfg.global_batch_size)

    out = paths.taps(images, training=True)
    terms = {"plain_ce": mean(cross_entropy(labels, out["logits"])),
             "weight_decay": tf.nn.scale_regularization_loss(l2_penalty(paths.taps, cfg.weight_decay)),
             "train_acc": mean(accuracy(labels, out["logits"]))}
    # One teacher call, when KD needs its logits or a rescaled entry its features.
    wants_targets = (cfg.kd_alpha > 0 and paths.points) or cfg.logit_kd_alpha > 0
    teacher_out = (paths.teacher_outputs(teacher, images)
                   if wants_targets or paths.teacher_taps is not None else None)
    soft_targets = tf.stop_gradient(teacher_out["logits"]) if wants_targets else None
    hybrid_sum = tf.constant(0.0)
    for i, logits in enumerate(paths.logits(out, teacher_out), start=1):
        terms[f"hybrid_ce_{i}"] = mean(cross_entropy(labels, logits))
        hybrid_sum += terms[f"hybrid_ce_{i}"]
        if soft_targets is not None:
            terms[f"kd_{i}"] = mean(kd_loss(soft_targets, logits, cfg.temperature))
            hybrid_sum += cfg.kd_alpha * terms[f"kd_{i}"]
    scale = 1.0 / (len(paths.points) + 1) if cfg.normalize else 1.0
    terms["total"] = scale * (terms["plain_ce"] + blend * hybrid_sum) + terms["weight_decay"]
    if cfg.logit_kd_alpha > 0:
        terms["logit_kd"] = mean(kd_loss(soft_targets, out["logits"], cfg.temperature))
        terms["total"] += kd_weight * cfg.logit_kd_alpha * terms["logit_kd"]
    if joint:
        terms.update(teacher_losses(teacher, images, labels, cfg))
    return terms
