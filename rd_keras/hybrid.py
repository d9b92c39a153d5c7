"""Hybrid paths: the plain net's first i stages followed by the teacher ResNet's remaining stages.

For a network with N stages there are N-1 stage boundaries, and hybrid path i (1 <= i < N) is

    logits_i = teacher[stage i+1 .. logits](plain[input .. stage i](x)).

The tails are Keras sub-models cut out of the teacher's functional graph, so they share the teacher's layers
and weights: nothing is copied, and a teacher update is immediately seen by every tail. The plain forward is
computed once (its dict output holds every boundary tensor) and each tail is applied to it.
"""

import keras

from rd_keras import architectures


def teacher_tails(teacher) -> list:
    """[tail_1, ..., tail_{N-1}]: tail_i maps the `stage{i}` tensor to the teacher's logits."""
    stages = architectures.num_stages(teacher)
    if stages < 2:
        raise ValueError(f"Hybrid paths need a teacher with at least 2 stages; {teacher.name!r} has "
                         f"{stages}.")
    logits = teacher.get_layer("logits").output
    return [keras.Model(teacher.get_layer(f"stage{i}").output, logits, name=f"{teacher.name}_tail{i}")
            for i in range(1, stages)]


def hybrid_logits(tails, plain_outputs) -> list:
    """Logits of every hybrid path, given the plain net's dict output.

    The tails run in inference mode: the teacher's BatchNorm uses its moving statistics, so plain-net
    features never leak into the teacher's statistics. Gradients still flow through the tails into the
    plain net's early stages, which is what the hybrid losses are for.
    """
    return [tail(plain_outputs[f"stage{i}"], training=False) for i, tail in enumerate(tails, start=1)]
