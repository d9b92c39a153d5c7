"""Losses and distributed steps: the Residual Distillation step, the supervised step and evaluation.

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
             "train_acc": mean(_accuracy(labels, out["logits"]))}
    soft_targets = None
    if (cfg.kd_alpha > 0 and paths.points) or cfg.logit_kd_alpha > 0:
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
    if cfg.logit_kd_alpha > 0:
        terms["logit_kd"] = mean(kd_loss(soft_targets, out["logits"], cfg.temperature))
        terms["total"] += kd_weight * cfg.logit_kd_alpha * terms["logit_kd"]
    if joint:
        terms.update(teacher_losses(teacher, images, labels, cfg))
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
    """Whether the step numbered `step` (before its increment) measures gradient norms: the last step
    before each log point, so that every logged interval carries exactly one measurement."""
    return (step + 1) % every == 0


@dataclasses.dataclass(frozen=True)
class GradNorms:
    """Per-stage gradient norms of some loss terms w.r.t. one net's variables.

    `sources` maps a label to the term names summed into it, e.g. {"plain": ["plain_ce"], "hybrid":
    ["hybrid_ce_1", "hybrid_ce_2"]}: the norm of d(sum)/d(variables of stage s) is reported as
    `grad_norm/{label}/{s}`. The norm is of each replica's gradient on its own batch, averaged over
    replicas (on one device: the gradient of the batch). Unweighted by m(t), so that the plain and hybrid
    sources can be compared as the blend decays."""

    variables: list
    sources: dict

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
    """`train_step(iterator, diagnose=False) -> dict of scalars`, doing one update of every `Update`.

    `loss_fn(images, labels)` returns per-replica terms (see `distill_losses`), and every update's gradient
    comes from that one forward pass. A list of loss functions, one per update, runs them in order instead:
    each update is applied before the next forward pass (a joint teacher updated before its student, as the
    paper's official code does); with `nan_skip`, each such phase is skipped on its own. `state_variables` (BN moving
    statistics) are averaged across replicas after the forward pass: keras 3 updates each replica's copy
    on its own, and without this the replicas' statistics drift apart. With `nan_skip`, a step whose losses
    or gradients are not all finite changes nothing (weights, optimizer slots, BN statistics) and reports
    `skipped=1`. `extras_fn(step)` adds unreduced scalars (learning rate, blend). `step` is incremented.

    With `grad_norms` (a `GradNorms`) and `diagnose=True`, the step also reports its `grad_norm/...` values,
    measured on the step's own batch right after the update by a separate function that restores the BN
    statistics it touched. The update itself runs the same graph either way, so a diagnostic never changes
    training: a run with diagnostics ends with the same weights, bit for bit, as one without.
    """
    if not updates:
        raise ValueError("build_train_step needs at least one Update.")
    if callable(loss_fn):
        phases = [(loss_fn, list(updates))]
    elif len(loss_fn) == len(updates):
        phases = [(fn, [u]) for fn, u in zip(loss_fn, updates)]
    else:
        raise ValueError(f"build_train_step needs one loss function, or one per update ({len(updates)}), "
                         f"got {len(loss_fn)}.")
    state_variables = list(state_variables)
    sync_state = strategy.num_replicas_in_sync > 1

    def forward_backward_of(fn, phase_updates):
        @tf.function(jit_compile=jit_compile)
        def forward_backward(images, labels):
            with tf.GradientTape(persistent=len(phase_updates) > 1) as tape:
                terms = fn(images, labels)
                objectives = [u.optimizer.scale_loss(terms[u.objective]) if _loss_scaled(u.optimizer)
                              else terms[u.objective] for u in phase_updates]
            return terms, [tape.gradient(obj, u.variables) for obj, u in zip(objectives, phase_updates)]

        return forward_backward

    steps = [(forward_backward_of(fn, us), us) for fn, us in phases]

    def run_phase(ctx, forward_backward, phase_updates, images, labels):
        terms, grads = forward_backward(images, labels)

        def apply(grads):
            for u, g in zip(phase_updates, grads):
                u.optimizer.apply(g, u.variables)

        finite = tf.constant(True)
        if nan_skip:
            # Loss-scaled grads may overflow legitimately; LossScaleOptimizer skips those updates itself.
            checked = list(terms.values()) + [
                g for u, gs in zip(phase_updates, grads) if not _loss_scaled(u.optimizer) for g in gs]
            bad = ctx.all_reduce(SUM, 1.0 - tf.cast(_all_finite(checked), tf.float32))
            finite = tf.equal(bad, 0.0)
            if all(_loss_scaled(u.optimizer) for u in phase_updates):
                apply(grads)
            else:
                _apply_if(finite, apply, grads)
        else:
            apply(grads)
        return terms, finite

    def replica_step(images, labels):
        ctx = tf.distribute.get_replica_context()
        before = [tf.identity(v) for v in state_variables] if nan_skip else None
        terms, finite = {}, tf.constant(True)
        for forward_backward, phase_updates in steps:
            phase_terms, phase_finite = run_phase(ctx, forward_backward, phase_updates, images, labels)
            terms.update(phase_terms)
            finite = tf.logical_and(finite, phase_finite) if len(steps) > 1 else phase_finite
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
        return terms, 1.0 - tf.cast(finite, tf.float32)

    @tf.function
    def update(iterator, keep_batch):
        images, labels = next(iterator)
        terms, skipped = strategy.run(replica_step, args=(images, labels))
        out = {k: strategy.reduce(SUM, v, axis=None) for k, v in terms.items()}
        if nan_skip:
            out["skipped"] = strategy.reduce(tf.distribute.ReduceOp.MEAN, skipped, axis=None)
        if extras_fn is not None:
            out.update(extras_fn(step))
        step.assign_add(1)
        return out, ((images, labels) if keep_batch else None)

    def all_terms(images, labels):
        terms = {}
        for fn, _ in phases:
            terms.update(fn(images, labels))
        return terms

    measure = None if grad_norms is None else _build_grad_norm_measure(strategy, all_terms, grad_norms,
                                                                       state_variables)

    def train_step(iterator, diagnose=False):
        if measure is None or not diagnose:
            return update(iterator, False)[0]
        out, batch = update(iterator, True)
        return {**out, **measure(*batch)}

    return train_step


def _build_grad_norm_measure(strategy, loss_fn, grad_norms, state_variables):
    """A tf.function `measure(images, labels) -> {grad_norm/...: replica mean}`. Its forward pass runs in
    training mode, as the step's does, and the BN statistics it moves are put back."""
    # Each replica's terms are its share of the global mean: rescale to its own batch's gradient.
    scale = float(strategy.num_replicas_in_sync)

    def replica_measure(images, labels):
        saved = [tf.identity(v) for v in state_variables]
        with tf.GradientTape(persistent=True) as tape:
            terms = loss_fn(images, labels)
        norms = grad_norms.measure(tape, terms, scale)
        with tf.control_dependencies(list(norms.values())):
            for v, value in zip(state_variables, saved):
                v.assign(value)
        return norms

    @tf.function
    def measure(images, labels):
        norms = strategy.run(replica_measure, args=(images, labels))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in norms.items()}

    return measure


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
