"""Losses and distributed steps: the Residual Distillation step, the supervised step and evaluation.

RD objective of the plain (student) net, per global batch:

    total = CE(y, plain) + m(t) * sum_i [CE(y, hybrid_i) + kd_alpha * T^2 * KL(p_teacher^T || p_hybrid_i^T)]
            + weight decay of the plain net

With `normalize` the cross-entropy part is divided by the number of paths (hybrid paths + the plain one), as
the paper's official code averages its losses; weight decay is not divided.

The hybrid terms are differentiated w.r.t. the plain variables only: they never move the teacher, but their
gradient reaches the plain net's early stages *through* the teacher's later stages. In `joint` mode the
teacher is trained at the same time on its own CE (+ its own weight decay) by its own optimizer.

Every step runs under `strategy.run` and works with any tf.distribute strategy. Per-example losses are
averaged with the *global* batch size and weight decay is divided by the number of replicas, so that the
gradients summed across replicas by the optimizer equal the single-device gradient of the global batch.
"""

import dataclasses
import re

import keras
import tensorflow as tf

SUM = tf.distribute.ReduceOp.SUM


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Numbers the losses need. `weight_decay` is the L2 coefficient: penalty = wd/2 * sum ||kernel||^2,
    i.e. a gradient of wd * kernel, as with PyTorch's SGD(weight_decay=wd). `global_batch_size=None`
    takes each step's own batch size (per-replica size x replicas), for `fit()`, whose last batch may be
    smaller."""

    global_batch_size: int | None
    weight_decay: float = 0.0
    temperature: float = 4.0
    kd_alpha: float = 0.0
    normalize: bool = False

    def __post_init__(self):
        if self.global_batch_size is not None and (not isinstance(self.global_batch_size, int)
                                                   or self.global_batch_size < 1):
            raise ValueError(f"global_batch_size must be a positive int or None, got {self.global_batch_size!r}.")
        if self.weight_decay < 0 or self.kd_alpha < 0:
            raise ValueError(f"weight_decay and kd_alpha must be >= 0, got {self.weight_decay!r} and "
                             f"{self.kd_alpha!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")


@dataclasses.dataclass(frozen=True)
class Update:
    """One optimizer minimising `terms[objective]` w.r.t. `variables`."""

    objective: str
    optimizer: keras.optimizers.Optimizer
    variables: list


# ----------------------------------------------------------------------------- losses


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
    """wd/2 * sum of squared conv and dense kernels (BN parameters and biases are not decayed)."""
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    if not kernels or weight_decay == 0:
        return tf.constant(0.0)
    return 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in kernels])


def _accuracy(labels, logits):
    predictions = tf.argmax(logits, -1, output_type=tf.int32)
    return tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)), tf.float32)


def supervised_losses(model, images, labels, cfg: LossConfig):
    """Terms of a plain supervised step, each already a per-replica share of the global mean."""
    def mean(per_example):
        return tf.nn.compute_average_loss(per_example, global_batch_size=cfg.global_batch_size)

    logits = model(images, training=True)["logits"]
    terms = {"ce": mean(cross_entropy(labels, logits)),
             "weight_decay": tf.nn.scale_regularization_loss(l2_penalty(model, cfg.weight_decay)),
             "train_acc": mean(_accuracy(labels, logits))}
    terms["total"] = terms["ce"] + terms["weight_decay"]
    return terms


def distill_losses(paths, teacher, images, labels, *, blend, cfg: LossConfig, joint: bool):
    """Terms of an RD step: `total` is the plain net's objective, `teacher_total` (joint mode) the teacher's.

    `paths` is a `hybrid.HybridPaths`; hybrid path i gives `hybrid_ce_{i}` and, when kd_alpha > 0, `kd_{i}`.
    """
    def mean(per_example):
        return tf.nn.compute_average_loss(per_example, global_batch_size=cfg.global_batch_size)

    out = paths.taps(images, training=True)
    terms = {"plain_ce": mean(cross_entropy(labels, out["logits"])),
             "weight_decay": tf.nn.scale_regularization_loss(l2_penalty(paths.taps, cfg.weight_decay)),
             "train_acc": mean(_accuracy(labels, out["logits"]))}
    soft_targets = None
    if cfg.kd_alpha > 0:
        soft_targets = tf.stop_gradient(teacher(images, training=False)["logits"])
    hybrid_sum = tf.constant(0.0)
    for i, logits in enumerate(paths.logits(out), start=1):
        terms[f"hybrid_ce_{i}"] = mean(cross_entropy(labels, logits))
        hybrid_sum += terms[f"hybrid_ce_{i}"]
        if soft_targets is not None:
            terms[f"kd_{i}"] = mean(kd_loss(soft_targets, logits, cfg.temperature))
            hybrid_sum += cfg.kd_alpha * terms[f"kd_{i}"]
    scale = 1.0 / (len(paths.points) + 1) if cfg.normalize else 1.0
    terms["total"] = scale * (terms["plain_ce"] + blend * hybrid_sum) + terms["weight_decay"]
    if joint:
        teacher_logits = teacher(images, training=True)["logits"]
        terms["teacher_ce"] = mean(cross_entropy(labels, teacher_logits))
        terms["teacher_weight_decay"] = tf.nn.scale_regularization_loss(l2_penalty(teacher, cfg.weight_decay))
        terms["teacher_total"] = terms["teacher_ce"] + terms["teacher_weight_decay"]
    return terms


# ----------------------------------------------------------------------------- steps


def _loss_scaled(optimizer):
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def _all_finite(tensors):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None])


def _apply_if(finite, apply_fn, grads):
    """Runs `apply_fn(grads)` on every replica iff `finite` (equal on all replicas). Optimizers all-reduce
    inside `apply`, so the branch is taken in cross-replica context, as keras' LossScaleOptimizer does;
    `grads` goes through `merge_call` so that each replica applies its own gradients."""
    def cross_replica(strategy, finite, grads):
        first = strategy.experimental_local_results(finite)[0]
        tf.cond(first, lambda: strategy.extended.call_for_each_replica(apply_fn, args=(grads,)), lambda: None)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, grads))


def stage_of(variable) -> str:
    """The part of a built net a variable belongs to: `stem`, `stage{i}` or `logits` (from its layer name)."""
    match = re.match(r"(stem|stage\d+|logits)", variable.path.split("/")[-2] if "/" in variable.path else "")
    return match.group(1) if match else "other"


def is_diagnostic_step(step, every):
    """Whether the step numbered `step` (before its increment) computes gradient norms: the last step
    before each log point, so that every logged interval carries exactly one measurement. `step` may be a
    Python int (the loop) or the step variable (inside the train step)."""
    if tf.is_tensor(step) or isinstance(step, tf.Variable):
        return tf.equal((step + 1) % every, 0)
    return (step + 1) % every == 0


@dataclasses.dataclass(frozen=True)
class GradNorms:
    """Per-stage gradient norms of some loss terms w.r.t. one net's variables, every `every` steps.

    `sources` maps a label to the term names summed into it, e.g. {"plain": ["plain_ce"], "hybrid":
    ["hybrid_ce_1", "hybrid_ce_2"]}: the norm of d(sum)/d(variables of stage s) is reported as
    `grad_norm/{label}/{s}`. The norm is of each replica's gradient on its own batch, averaged over
    replicas (on one device: the gradient of the batch). Unweighted by m(t), so that the plain and hybrid
    sources can be compared as the blend decays."""

    variables: list
    sources: dict
    every: int

    def keys(self):
        stages = sorted({stage_of(v) for v in self.variables})
        return [f"grad_norm/{label}/{stage}" for label in self.sources for stage in stages]

    def measure(self, tape, terms, scale):
        by_stage = {}
        for v in self.variables:
            by_stage.setdefault(stage_of(v), []).append(v)
        out = {}
        for label, names in self.sources.items():
            # A list of targets: their gradients are summed (a sum op built here would be off the tape).
            grads = tape.gradient([terms[n] for n in names], self.variables)
            squares = {}
            for v, g in zip(self.variables, grads):
                if g is not None:
                    squares.setdefault(stage_of(v), []).append(tf.reduce_sum(tf.square(tf.cast(g, tf.float32))))
            for stage in sorted(by_stage):
                total = tf.add_n(squares[stage]) if stage in squares else tf.constant(0.0)
                out[f"grad_norm/{label}/{stage}"] = scale * tf.sqrt(total)
        return out


def build_train_step(strategy, loss_fn, updates, *, step, state_variables=(), nan_skip=False,
                     jit_compile=False, extras_fn=None, grad_norms=None):
    """A tf.function `train_step(iterator) -> dict of scalars` doing one update of every `Update`.

    `loss_fn(images, labels)` returns per-replica terms (see `distill_losses`). `state_variables` (BN moving
    statistics) are averaged across replicas after the forward pass: keras 3 updates each replica's copy
    on its own, and without this the replicas' statistics drift apart. With `nan_skip`, a step whose losses
    or gradients are not all finite changes nothing (weights, optimizer slots, BN statistics) and reports
    `skipped=1`. `extras_fn(step)` adds unreduced scalars (learning rate, blend). `step` is incremented.
    With `grad_norms` (a `GradNorms`), steps for which `is_diagnostic_step` holds also report its
    `grad_norm/...` values (zeros on the other steps, which the loop ignores).
    """
    if not updates:
        raise ValueError("build_train_step needs at least one Update.")
    state_variables = list(state_variables)
    sync_state = strategy.num_replicas_in_sync > 1

    @tf.function(jit_compile=jit_compile)
    def forward_backward(images, labels, diagnose):
        with tf.GradientTape(persistent=len(updates) > 1 or grad_norms is not None) as tape:
            terms = loss_fn(images, labels)
            objectives = [u.optimizer.scale_loss(terms[u.objective]) if _loss_scaled(u.optimizer)
                          else terms[u.objective] for u in updates]
        grads = [tape.gradient(obj, u.variables) for obj, u in zip(objectives, updates)]
        norms = {}
        if grad_norms is not None:
            # Each replica's terms are its share of the global mean: rescale to its own batch's gradient.
            scale = float(strategy.num_replicas_in_sync)
            norms = tf.cond(diagnose, lambda: grad_norms.measure(tape, terms, scale),
                            lambda: {k: tf.constant(0.0) for k in grad_norms.keys()})
        return terms, grads, norms

    def replica_step(images, labels):
        ctx = tf.distribute.get_replica_context()
        before = [tf.identity(v) for v in state_variables] if nan_skip else None
        diagnose = tf.constant(False) if grad_norms is None else is_diagnostic_step(step, grad_norms.every)
        terms, grads, norms = forward_backward(images, labels, diagnose)

        def apply(grads):
            for u, g in zip(updates, grads):
                u.optimizer.apply(g, u.variables)

        finite = tf.constant(True)
        if nan_skip:
            # Loss-scaled grads may overflow legitimately; LossScaleOptimizer skips those updates itself.
            checked = list(terms.values()) + [
                g for u, gs in zip(updates, grads) if not _loss_scaled(u.optimizer) for g in gs]
            bad = ctx.all_reduce(SUM, 1.0 - tf.cast(_all_finite(checked), tf.float32))
            finite = tf.equal(bad, 0.0)
            if all(_loss_scaled(u.optimizer) for u in updates):
                apply(grads)
            else:
                _apply_if(finite, apply, grads)
        else:
            apply(grads)
        if state_variables and (sync_state or nan_skip):
            # tf.identity places each read on this replica's device: all_reduce needs a device to
            # reduce to, and a bare read of a multi-worker variable has none.
            values = [tf.identity(v) for v in state_variables]
            if sync_state:
                values = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, values)
            if nan_skip:
                values = [tf.where(finite, new, old) for new, old in zip(values, before)]
            for v, value in zip(state_variables, values):
                v.assign(value)
        return terms, norms, 1.0 - tf.cast(finite, tf.float32)

    @tf.function
    def train_step(iterator):
        images, labels = next(iterator)
        terms, norms, skipped = strategy.run(replica_step, args=(images, labels))
        out = {k: strategy.reduce(SUM, v, axis=None) for k, v in terms.items()}
        out.update({k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in norms.items()})
        if nan_skip:
            out["skipped"] = strategy.reduce(tf.distribute.ReduceOp.MEAN, skipped, axis=None)
        if extras_fn is not None:
            out.update(extras_fn(step))
        step.assign_add(1)
        return out

    return train_step


def build_eval_step(strategy, model, teacher=None, paths=None):
    """A tf.function `eval_step(distributed_batch) -> dict of sums over the global batch`: `count`,
    `correct` and `ce` of `model`, plus `teacher_correct` and `hybrid_correct_{i}` when a teacher and its
    `hybrid.HybridPaths` are given."""
    def replica_step(images, labels):
        out = (model if paths is None else paths.taps)(images, training=False)
        sums = {"count": tf.cast(tf.shape(labels)[0], tf.float32),
                "correct": tf.reduce_sum(_accuracy(labels, out["logits"])),
                "ce": tf.reduce_sum(cross_entropy(labels, out["logits"]))}
        if teacher is not None:
            teacher_logits = teacher(images, training=False)["logits"]
            sums["teacher_correct"] = tf.reduce_sum(_accuracy(labels, teacher_logits))
            for i, logits in enumerate(paths.logits(out), start=1):
                sums[f"hybrid_correct_{i}"] = tf.reduce_sum(_accuracy(labels, logits))
        return sums

    @tf.function
    def eval_step(batch):
        sums = strategy.run(replica_step, args=batch)
        return {k: strategy.reduce(SUM, v, axis=None) for k, v in sums.items()}

    return eval_step


def build_cross_replica_sum(strategy):
    """A tf.function `cross_sum(values) -> the float64 vector `values` summed over all replicas of all
    workers`, for host-side decisions every worker must take alike (stop now? same checkpoint?). A
    collective: every worker calls it at the same point of the run."""
    @tf.function
    def cross_sum(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(SUM, per_replica, axis=None)

    return cross_sum


def evaluate(eval_step, distributed_dataset):
    """Runs `eval_step` over the dataset: {"acc", "loss", and with a teacher "teacher_acc", "hybrid_acc"}."""
    totals = {}
    for batch in distributed_dataset:
        for k, v in eval_step(batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count", 0.0)
    if not count:
        raise ValueError("The evaluation dataset is empty.")
    result = {"acc": totals["correct"] / count, "loss": totals["ce"] / count}
    if "teacher_correct" in totals:
        result["teacher_acc"] = totals["teacher_correct"] / count
        paths = sum(k.startswith("hybrid_correct_") for k in totals)
        result["hybrid_acc"] = [totals[f"hybrid_correct_{i}"] / count for i in range(1, paths + 1)]
    return result
