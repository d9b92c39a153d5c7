"""Hybrid paths: the plain net's first layers followed by the teacher ResNet's remaining layers.

A hybrid path starts at a *hybrid point*, the output of one residual block. Every block boundary has the
same shape in the ResNet and its plain twin, so for a point after block b

    logits_b = teacher[block b+1 .. logits](plain[input .. block b](x)).

`distill.hybrid_points` chooses the points: `stages` (the stage boundaries, the paper's default),
`every_k_blocks:K`, an explicit list of block numbers (1-based, counted across stages, as the official
code's `dis_point`), or `none` (no path: the knowledge-distillation baseline). More points give the plain net's early layers more short gradient paths, at the cost of
one teacher tail (forward and backward) each.

The tails are Keras sub-models cut out of the teacher's functional graph, so they share the teacher's layers
and weights: nothing is copied, and a teacher update is immediately seen by every tail. The plain forward is
computed once (`HybridPaths.taps` exposes every point's tensor next to the logits) and each tail is applied to it.
"""

import dataclasses
import re

import keras
import tensorflow as tf

from rd_keras import architectures

STAGES = "stages"
NONE = "none"  # no hybrid path: the teacher reaches the plain net only through KD on its logits
# How plain features enter a teacher tail: as they are (the paper), or rescaled per channel to the teacher's
# root mean square at the same point. A ResNet's residual stream grows with depth (a trained ResNet-110's
# stage outputs are 5-6x a KD-trained plain-110's: `bench feature-scale`), and a tail in inference mode
# normalises by the teacher's statistics.
ENTRIES = ("direct", "rescale")


def block_outputs(model) -> list[str]:
    """Names of the layers that end each residual block, in order: `stage{i}_block{j}_out`, or `stage{i}`
    for the last block of stage i (as `architectures.build` names them)."""
    parsed = {layer.name: architectures.parse_block_output(layer.name) for layer in model.layers}
    out = [name for name, found in parsed.items() if found]
    return sorted(out, key=lambda name: (parsed[name][0], parsed[name][1] or float("inf")))


def hybrid_points(blocks, spec: str = STAGES, name: str = "the net") -> list[str]:
    """The layer names where hybrid paths start, for `spec` = "stages", "every_k_blocks:K", "b1,b2,..." or
    "none" (no path, []), given the block-output names of a net (`block_outputs(model)` or
    `architectures.block_output_names`).

    Points lie strictly before the last block: a path from there would be the plain net itself."""
    usable = len(blocks) - 1
    spec = str(spec).strip()
    if spec == NONE:
        return []
    if spec == STAGES:
        chosen = [i for i, name in enumerate(blocks[:-1], start=1) if architectures.is_stage_endpoint(name)]
    elif spec.startswith("every_k_blocks:"):
        k = spec.partition(":")[2]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"distill.hybrid_points: every_k_blocks needs a positive integer K. "
                             f"Received: hybrid_points={spec!r}")
        chosen = list(range(int(k), usable + 1, int(k)))
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", spec):
        chosen = sorted({int(b) for b in spec.split(",")})
        if chosen[0] < 1 or chosen[-1] > usable:
            raise ValueError(f"distill.hybrid_points: block numbers must be in 1..{usable} for "
                             f"{name!r} ({len(blocks)} blocks). Received: hybrid_points={spec!r}")
    else:
        raise ValueError(f"distill.hybrid_points must be 'stages', 'every_k_blocks:K', 'none' or a "
                         f"comma-separated list of block numbers. Received: hybrid_points={spec!r}")
    if not chosen:
        raise ValueError(f"distill.hybrid_points={spec!r} gives no hybrid path for {name!r} "
                         f"({len(blocks)} blocks).")
    return [blocks[i - 1] for i in chosen]


def teacher_tails(teacher, points) -> list:
    """[tail_1, ..., tail_n]: tail_i maps the tensor at `points[i-1]` to the teacher's logits."""
    if points and architectures.num_stages(teacher) < 2:
        raise ValueError(f"Hybrid paths need a teacher with at least 2 stages; {teacher.name!r} has "
                         f"{architectures.num_stages(teacher)}.")
    logits = teacher.get_layer("logits").output
    return [keras.Model(teacher.get_layer(p).output, logits, name=f"{teacher.name}_tail_{p}") for p in points]


@dataclasses.dataclass(frozen=True)
class HybridPaths:
    """Everything an RD step needs of the hybrid paths.

    `taps` is the plain net with a dict output holding its own outputs plus the tensor at every hybrid
    point (shared layers, no copy): one call gives the plain logits and every hybrid path's input."""

    points: tuple
    tails: tuple
    taps: keras.Model
    entry: str = "direct"
    # teacher input -> {point: tensor, "logits": ...}, for entry="rescale": one teacher forward gives the
    # scales and the KD targets
    teacher_taps: keras.Model | None = None

    def teacher_outputs(self, teacher, images) -> dict:
        """The teacher's one inference call on `images`: its `logits` (the KD targets), plus its features at
        the points when the entry rescales by them."""
        return (teacher if self.teacher_taps is None else self.teacher_taps)(images, training=False)

    def logits(self, plain_outputs, teacher_outputs=None) -> list:
        """Logits of every hybrid path, given the dict output of `taps`, and for entry="rescale" the
        `teacher_outputs` of the same images, whose features set each channel's scale.

        The tails run in inference mode: the teacher's BatchNorm uses its moving statistics, so plain-net
        features never leak into the teacher's statistics. Gradients still flow through the tails into the
        plain net's early layers, which is what the hybrid losses are for.
        """
        inputs = [plain_outputs[p] for p in self.points]
        if self.teacher_taps is not None:
            if teacher_outputs is None:
                raise ValueError("Hybrid paths with entry='rescale' need the teacher's features: "
                                 "logits(outputs, paths.teacher_outputs(teacher, images)).")
            inputs = [rescale(x, tf.stop_gradient(teacher_outputs[p])) for x, p in zip(inputs, self.points)]
        # One tail per path. Stacking every path's rows through each teacher piece once was measured no
        # faster on CPU (docs/results/notes.md, "RD + KD step cost"), so the tails stay separate.
        return [tail(x, training=False) for x, tail in zip(inputs, self.tails)]


def rescale(plain, teacher, epsilon=1e-6):
    """`plain` with each channel scaled so that its root mean square over the batch and space equals
    `teacher`'s. A scale, not a shift: post-ReLU zeros stay zeros. The gradient flows through the plain
    net's own RMS, as through BatchNorm's batch statistics, so the tail sees the feature's pattern, not its
    size."""
    axes = list(range(len(plain.shape) - 1))
    x = tf.cast(plain, tf.float32)
    rms_plain = tf.sqrt(tf.reduce_mean(tf.square(x), axis=axes) + epsilon)
    rms_teacher = tf.sqrt(tf.reduce_mean(tf.square(tf.cast(teacher, tf.float32)), axis=axes) + epsilon)
    return tf.cast(x * (rms_teacher / rms_plain), plain.dtype)


def build_paths(plain, teacher, spec: str = STAGES, entry: str = "direct") -> HybridPaths:
    """The hybrid paths from `plain` into `teacher` at the points `spec` chooses (see `hybrid_points`);
    `entry` (one of ENTRIES) says how the plain features enter the teacher's tails."""
    if entry not in ENTRIES:
        raise ValueError(f"distill.hybrid_entry must be one of {ENTRIES}. Received: hybrid_entry={entry!r}")
    points = tuple(hybrid_points(block_outputs(teacher), spec, teacher.name))
    outputs = dict(plain.output)
    for p in points:
        outputs.setdefault(p, plain.get_layer(p).output)
    taps = keras.Model(plain.input, outputs, name=f"{plain.name}_taps")
    teacher_taps = None
    if entry == "rescale" and points:
        found = {p: teacher.get_layer(p).output for p in points}
        found["logits"] = teacher.get_layer("logits").output
        teacher_taps = keras.Model(teacher.input, found, name=f"{teacher.name}_taps")
    return HybridPaths(points, tuple(teacher_tails(teacher, points)), taps, entry, teacher_taps)
