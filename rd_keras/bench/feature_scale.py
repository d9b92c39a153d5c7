"""`bench feature-scale`: how large the plain net's features are where the hybrid paths enter the teacher.

    python -m rd_keras.bench feature-scale --workdir=runs/s16/d110_kd_dirac [--workdir=...] [--json=F]

For each finished distillation workdir (its `plain.keras` and the teacher its config names), both nets run
in inference mode on the first `--images` evaluation images of the run's own data pipeline (the validation
split when the run held one out). At every hybrid point (`--points`, default the stage boundaries) it
reports the root mean square of each channel over images and positions, averaged over channels, for the
teacher (`teacher_rms`) and the plain net (`plain_rms`), and their ratio per channel (`ratio`: median over
channels of teacher / plain). A hybrid path feeds the plain features to the teacher's tail as they are, so a
ratio far from 1 means the tail, normalising with the teacher's own BatchNorm statistics, sees inputs of a
size it never saw in training (`distill.hybrid_entry=rescale` matches the sizes per channel).
"""

from __future__ import annotations

import os

import numpy as np

from rd_keras.bench import common

IMAGES = 512


def add_arguments(parser):
    parser.add_argument("--workdir", action="append", required=True,
                        help="a finished distillation workdir (plain.keras + config.json); repeatable")
    parser.add_argument("--points", default="stages",
                        help="hybrid points to measure: stages, every_k_blocks:K or block numbers "
                             "(default: %(default)s)")
    parser.add_argument("--images", type=int, default=IMAGES,
                        help="evaluation images to measure on (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the numbers here")


def _nets(workdir):
    """(config, teacher, plain) of a finished distillation workdir, with one clear error each."""
    from rd_keras import teacher
    from rd_keras import workdir as wd
    from rd_keras.export import workdir_export

    config, plain = workdir_export.load_workdir(workdir)
    if config.train.mode != "distill" or config.teacher.mode != "pretrained":
        raise common.FlagError(f"--workdir {workdir!r} is not a run distilled from a pretrained teacher "
                               f"(train.mode={config.train.mode!r}, teacher.mode={config.teacher.mode!r}).")
    path = config.teacher.path or wd.teacher_dir(workdir)  # the two-phase recipe trains it inside
    info = workdir_export.dataset_info(config)
    resnet = teacher.load(teacher.resolve(path, config.teacher.weights), model_config=config.model,
                          num_classes=info.num_classes, input_shape=info.image_shape)
    return config, resnet, plain


def _images(config, count):
    from rd_keras import data

    _, eval_ds, _ = data.pipelines(config)
    parts, total = [], 0
    for images, _ in eval_ds:
        parts.append(images.numpy())
        total += len(parts[-1])
        if total >= count:
            break
    return np.concatenate(parts)[:count]


def channel_rms(features) -> np.ndarray:
    """Root mean square of each channel (last axis) over every other axis."""
    x = np.asarray(features, np.float64)
    return np.sqrt(np.mean(np.square(x), axis=tuple(range(x.ndim - 1))))


def measure(workdir, points_spec, count) -> list[dict]:
    """One row per hybrid point of the run in `workdir`."""
    import keras

    from rd_keras import hybrid

    config, resnet, plain = _nets(workdir)
    try:
        points = hybrid.hybrid_points(hybrid.block_outputs(resnet), points_spec, resnet.name)
    except ValueError as e:
        raise common.FlagError(f"--points: {e}") from None
    images = _images(config, count)
    rows = []
    taps = {name: keras.Model(net.input, [net.get_layer(p).output for p in points])
            for name, net in (("teacher", resnet), ("plain", plain))}
    found = {name: model(images, training=False) for name, model in taps.items()}
    for i, point in enumerate(points):
        t, p = channel_rms(found["teacher"][i]), channel_rms(found["plain"][i])
        rows.append({"workdir": workdir, "arch": config.model.arch, "point": point, "images": len(images),
                     "teacher_rms": float(t.mean()), "plain_rms": float(p.mean()),
                     "ratio": float(np.median(t / np.maximum(p, 1e-12)))})
    return rows


def table(rows) -> str:
    return common.format_table(
        [[r["workdir"], r["arch"], r["point"], f"{r['teacher_rms']:.3f}", f"{r['plain_rms']:.3f}",
          f"{r['ratio']:.2f}"] for r in rows],
        ["workdir", "arch", "point", "teacher RMS", "plain RMS", "ratio (median)"])


def report_section(payload) -> str:
    """The docs/results.md section of a `--json` payload."""
    rows = [[r["workdir"], r["point"], r["teacher_rms"], r["plain_rms"], r["ratio"]] for r in payload["results"]]
    return "\n\n".join([
        "## Feature scale at the hybrid points",
        common.provenance(payload),
        f"Per-channel root mean square of the features at each hybrid point, on {payload['settings']['images']} "
        "evaluation images, averaged over channels; **ratio** = median over channels of teacher / plain. The "
        "teacher's tail normalises its input with its own BatchNorm statistics: a ratio far from 1 is an input "
        "of a size the tail never saw.",
        common.md_table(rows, ["run", "point", "teacher RMS", "plain RMS", "ratio"]),
    ])


def run(args):
    load_at_start = common.load_average()
    common.check_positive(args.images, "--images")
    for workdir in args.workdir:
        if not os.path.isdir(workdir):
            raise common.FlagError(f"--workdir {workdir!r}: no such directory.")
    rows = [row for workdir in common.progress(args.workdir, "workdirs")
            for row in measure(workdir, args.points, args.images)]
    payload = {"command": "feature-scale", "machine": common.machine(args.argv, load_at_start),
               "settings": {"points": args.points, "images": args.images}, "results": rows}
    print(table(rows))
    if args.json:
        common.write_json(args.json, payload)
    return payload
