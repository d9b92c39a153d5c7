"""Ship the plain net of a training workdir: fold, export, check, report.

    python -m rd_keras.export --workdir=W [--format=saved_model|tflite|all]
        [--quantize=none,fp16,dynamic,int8] [--qat_steps=N] [--model_name=plain] [--eval_examples=1000]

reads `W/config.json` and `W/plain.keras`, folds BatchNormalization and Dirac convs into plain convs
(`rd_keras.export.folding`), and writes under `W/export/`:

- `saved_model/<model_name>/<version>/`: a new TF Serving version (`rd_keras.export.saved_model_export`),
  unless the newest version already holds these weights (`--new_version` writes one anyway),
- `tflite/plain_<quant>.tflite` for each requested quantisation, `plain_qat.tflite` when `--qat_steps > 0`
  (`rd_keras.export.tflite_export`, `rd_keras.export.qat`): uint8 pixels in, the normalisation inside
  (`rd_keras.export.pixels`), labels and input description in the file (`rd_keras.export.metadata`), and
  `tflite/labels.txt` beside them,
- `report.json`: for the Keras model and every artefact, accuracy on the same evaluation images (raw uint8
  pixels for the SavedModel and every .tflite), top-1 agreement with the Keras model, the largest
  probability difference, size and input contract.

The images come from `W/samples.npz` when it holds enough (`rd_keras.samples`; the run stored them at its
end), so a workdir copied without its data exports all the same; else from the data directory.

The same runs from Python with `export_workdir(...)`, e.g. at the end of training. docs/deploy.md has the
contracts and measured numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys

import keras
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm

from rd_keras import architectures, checkpointing, data, defaults, samples
from rd_keras import workdir as wd
from rd_keras.errors import RDError, exit_with_error
from rd_keras.export import folding, metadata, pixels, saved_model_export, tflite_export

FORMATS = ("saved_model", "tflite")
EVAL_BATCH = 100
# A correct fold changes logits only by float rounding; more than this means the fold itself is wrong.
FOLD_TOLERANCE = 1e-3


def load_workdir(workdir):
    """`(config, model)` from `workdir/config.json` and `workdir/plain.keras`, with one clear error each."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"Workdir not found: {workdir!r}")
    config_path, model_path = wd.config_path(workdir), wd.plain_path(workdir)
    for path in (config_path, model_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; is {workdir!r} a finished training workdir?")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if "data" in config:
        # A config.json from before a data field existed lacks it; the data pipeline reads every field.
        fields = defaults.data_config()
        fields.update(config.data.to_dict())
        config.data = fields
    return config, keras.saving.load_model(model_path, compile=False)


def dataset_info(config):
    """The image shape and pixel statistics the net was trained with.

    The trainer records them in config.json's `dataset` section; a config without it (written by hand)
    gets them from the data pipeline itself, which derives them the same way.
    """
    if "dataset" in config:
        fields = config.dataset
        return data.DatasetInfo(
            num_classes=int(fields.num_classes), image_shape=tuple(fields.image_shape),
            train_examples=int(fields.train_examples), eval_examples=int(fields.eval_examples),
            mean=tuple(fields.mean), std=tuple(fields.std),
            channel_order=fields.get("channel_order", "rgb"))
    return data.datasets(config)[2]


def _as_tuple(value, allowed, name):
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if "all" in items:
        items = list(allowed)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"`{name}` must be a comma-separated subset of {allowed} (or 'all'). "
                         f"Received: {name}={value!r}")
    return tuple(dict.fromkeys(items))  # dedupe, keep order


def _validate(model_name, qat_steps, qat_learning_rate, eval_examples, calibration_examples, formats,
              int8_io):
    if not model_name or model_name.startswith(".") or os.sep in model_name or model_name.isdigit():
        raise ValueError(f"`model_name` must be a plain directory name, not hidden and not a number. "
                         f"Received: model_name={model_name!r}")
    for name, value, low in (("qat_steps", qat_steps, 0), ("eval_examples", eval_examples, 1),
                             ("calibration_examples", calibration_examples, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}. Received: {name}={value!r}")
    if not (isinstance(qat_learning_rate, (int, float)) and qat_learning_rate > 0):
        raise ValueError(f"`qat_learning_rate` must be a positive number. "
                         f"Received: qat_learning_rate={qat_learning_rate!r}")
    if qat_steps and "tflite" not in formats:
        raise ValueError(f"QAT produces a .tflite file: `qat_steps` needs the tflite format. "
                         f"Received: qat_steps={qat_steps}, formats={formats}")
    if int8_io not in tflite_export.IO_TYPES:
        raise ValueError(f"`int8_io` must be one of {tflite_export.IO_TYPES}. Received: int8_io={int8_io!r}")


def parse_options(formats, quantize, *, model_name=defaults.MODEL_NAME, qat_steps=0,
                  qat_learning_rate=defaults.QAT_LEARNING_RATE, eval_examples=defaults.EVAL_EXAMPLES,
                  calibration_examples=defaults.CALIBRATION_EXAMPLES, int8_io=defaults.INT8_IO):
    """Checks export options before any work (also for training's end-of-run export); returns the
    `formats` and `quantize` selections as tuples."""
    formats = _as_tuple(formats, FORMATS, "formats")
    quantize = _as_tuple(quantize, tflite_export.QUANTIZATIONS, "quantize")
    _validate(model_name, qat_steps, qat_learning_rate, eval_examples, calibration_examples, formats,
              int8_io)
    return formats, quantize


def _batches(array, progress, desc):
    starts = range(0, len(array), EVAL_BATCH)
    for start in tqdm.tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        yield array[start:start + EVAL_BATCH]


def _compare(probabilities, labels, reference):
    top1 = probabilities.argmax(-1)
    return {"accuracy": float(np.mean(top1 == labels)),
            "top1_agreement": float(np.mean(top1 == reference.argmax(-1))),
            "max_abs_prob_diff": float(np.abs(probabilities - reference).max())}


def _keras_logits(model, normalised, progress, desc):
    return np.concatenate([keras.ops.convert_to_numpy(model(batch, training=False))
                           for batch in _batches(normalised, progress, desc)])


write_atomic = wd.write_atomic  # the one atomic writer (rd_keras.workdir)


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _export_saved_model(folded, workdir, model_name, info, examples, reference, source, new_version,
                        progress):
    model_dir = wd.saved_model_dir(workdir, model_name)
    existing = None if new_version else saved_model_export.up_to_date(model_dir, source)
    if existing:
        version, path = existing
        print(f"saved_model: version {version} already holds these weights (sha256 "
              f"{source['weights_sha256'][:12]}...): up to date, no new version written", flush=True)
    else:
        version, path = saved_model_export.export_version(
            folded, model_dir, image_shape=info.image_shape, mean=info.mean, std=info.std,
            channel_order=info.channel_order, warmup_images=examples.test_images, model_name=model_name,
            source=source)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    probabilities = np.concatenate([
        serve(images=tf.constant(batch))["probabilities"].numpy()
        for batch in _batches(examples.test_images, progress, "saved_model")])
    input_spec = {"dtype": "uint8", "shape": [-1, *info.image_shape], "normalised": False}
    return {"path": path, "version": version, "up_to_date": bool(existing), "size_bytes": _dir_size(path),
            "signatures": list(saved_model_export.SIGNATURES), "input": input_spec,
            **_compare(probabilities, examples.test_labels, reference)}


def _run_qat(workdir, path, *, steps, io_type, learning_rate, progress):
    # QAT runs in its own interpreter: importing tensorflow_model_optimization switches tf.keras to
    # tf_keras process-wide, which must never happen to the Keras 3 process that called us.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "rd_keras.export.qat", f"--workdir={workdir}", f"--steps={steps}",
               f"--output={path}", f"--io_type={io_type}", f"--learning_rate={learning_rate}",
               *([] if progress else ["--quiet"])]
    result = subprocess.run(command, env=env, check=False)
    if result.returncode or not os.path.isfile(path):
        raise RuntimeError(f"QAT failed (exit code {result.returncode}): {' '.join(command)}")
    with open(path, "rb") as f:
        return f.read()


def _export_tflite(folded, workdir, quantize, info, examples, reference, *, model_name, int8_io, qat_steps,
                   qat_learning_rate, progress):
    normalisation = pixels.Normalisation.of(info)
    write_atomic(wd.labels_path(workdir), "".join(f"{name}\n" for name in examples.label_names))
    results = {}
    for quant in quantize + (("qat",) if qat_steps else ()):
        path = wd.tflite_path(workdir, quant)
        if quant == "qat":
            payload = _run_qat(workdir, path, steps=qat_steps, io_type=int8_io, learning_rate=qat_learning_rate,
                               progress=progress)
        else:
            payload = tflite_export.convert(
                folded, info.image_shape, quant, examples.calibration_images if quant == "int8" else None,
                int8_io, progress, normalisation=normalisation)
        record = metadata.describe(
            model_name=model_name, quantization=quant, labels=examples.label_names, labels_file=wd.LABELS_FILE,
            image_shape=info.image_shape, normalisation=normalisation,
            implementation=metadata.implementation(quant, normalisation),
            output=tflite_export.TFLiteRunner(payload).input_contract()["output"])
        write_atomic(path, metadata.write(payload, record))
        runner = tflite_export.TFLiteRunner(path)
        # Raw uint8 pixels in: the file normalises them itself.
        probabilities = np.concatenate([runner(batch) for batch in
                                        _batches(examples.test_images, progress, f"tflite {quant}")])
        results[f"tflite_{quant}"] = {"path": path, "size_bytes": os.path.getsize(path),
                                      **runner.input_contract(),
                                      "normalisation": record["normalisation"]["implementation"],
                                      "float_tensors": len(runner.float_tensors()),
                                      # what the integer zero point moves the mean by, in pixel levels
                                      **({"mean_shift_pixels": round(normalisation.pixel_error(), 4)}
                                         if quant in ("int8", "qat") else {}),
                                      **_compare(probabilities, examples.test_labels, reference)}
    return results


def export_workdir(workdir, formats=FORMATS, quantize=tflite_export.QUANTIZATIONS, qat_steps=0,
                   model_name=defaults.MODEL_NAME, eval_examples=defaults.EVAL_EXAMPLES,
                   calibration_examples=defaults.CALIBRATION_EXAMPLES, int8_io=defaults.INT8_IO,
                   qat_learning_rate=defaults.QAT_LEARNING_RATE, progress=True, new_version=False):
    """Exports `workdir/plain.keras` as described in the module docstring; returns the report dict.

    `formats` and `quantize` take sequences or comma-separated strings ("all" selects everything).
    `new_version`: write a SavedModel version even when the newest one holds the same weights.
    """
    formats, quantize = parse_options(formats, quantize, model_name=model_name, qat_steps=qat_steps,
                                      qat_learning_rate=qat_learning_rate, eval_examples=eval_examples,
                                      calibration_examples=calibration_examples, int8_io=int8_io)
    config, model = load_workdir(workdir)
    info = dataset_info(config)
    classifier = architectures.classifier(model)
    folded = folding.fold(classifier)
    if tuple(classifier.input.shape[1:]) != tuple(info.image_shape):
        raise ValueError(f"{wd.plain_path(workdir)} takes images of shape {classifier.input.shape[1:]}, "
                         f"but config.json's data pipeline yields {info.image_shape}.")

    examples = samples.examples(
        config, workdir, test_examples=eval_examples, num_classes=info.num_classes,
        calibration_examples=calibration_examples if "tflite" in formats and "int8" in quantize else 0)
    if examples.stored:
        print(f"export: images from the stored samples {examples.source} ({len(examples.test_labels)} test, "
              f"{len(examples.calibration_images)} calibration); the data directory is not read", flush=True)
    labels = examples.test_labels
    normalised = data.normalize(examples.test_images, info.mean, info.std, info.channel_order).numpy()
    logits = _keras_logits(classifier, normalised, progress, "keras")
    unfolded = _keras_logits(folding.float32_copy(classifier), normalised, progress, "float32")
    fold_diff = float(np.abs(_keras_logits(folded, normalised, progress, "folded") - unfolded).max())
    if fold_diff > FOLD_TOLERANCE * (1.0 + np.abs(unfolded).max()):
        raise RuntimeError(f"Folded model differs from {wd.PLAIN_FILE} by {fold_diff} in the logits.")
    reference = tf.nn.softmax(logits).numpy()

    artefacts = {"keras": {"path": wd.plain_path(workdir),
                           "size_bytes": os.path.getsize(wd.plain_path(workdir)),
                           "input": {"dtype": "float32", "shape": [-1, *info.image_shape],
                                     "normalised": True},
                           **_compare(reference, labels, reference)}}
    if "saved_model" in formats:
        # What a version is made from: the net's weights (not plain.keras's bytes, which a rerun of a
        # finished training run rewrites with a new save date) and the normalisation.
        source = {"weights_sha256": checkpointing.weights_digest([classifier]),
                  "image_shape": list(info.image_shape), **dataclasses.asdict(pixels.Normalisation.of(info))}
        artefacts["saved_model"] = _export_saved_model(folded, workdir, model_name, info, examples, reference,
                                                       source, new_version, progress)
    if "tflite" in formats:
        artefacts.update(_export_tflite(
            folded, workdir, quantize, info, examples, reference, model_name=model_name, int8_io=int8_io,
            qat_steps=qat_steps, qat_learning_rate=qat_learning_rate, progress=progress))
    report = {
        "workdir": os.path.abspath(workdir),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": config.get("model", ml_collections.ConfigDict()).to_dict(),
        "data": {"image_shape": list(info.image_shape), "mean": list(info.mean), "std": list(info.std),
                 "channel_order": info.channel_order, "labels": examples.label_names},
        "eval": {"split": "test", "examples": int(len(labels)), "images": examples.source,
                 "calibration_examples": int(len(examples.calibration_images))},
        "fold": {"max_abs_logit_diff": fold_diff, "params": int(folded.count_params()),
                 "layers": len(folded.layers), "unfolded_params": int(classifier.count_params())},
        "artefacts": artefacts,
    }
    write_atomic(wd.report_path(workdir), json.dumps(report, indent=2).encode())
    return report


def format_table(report):
    """The report's artefacts as a fixed-width text table."""
    rows = [("artefact", "size", "accuracy", "vs keras", "top-1 agree", "max |dp|", "input")]
    keras_accuracy = report["artefacts"]["keras"]["accuracy"]
    for name, entry in report["artefacts"].items():
        spec = entry["input"]
        quant = f" q=({spec['scale']:.4g},{spec['zero_point']})" if "scale" in spec else ""
        rows.append((name, f"{entry['size_bytes'] / 1024:.1f} KiB", f"{entry['accuracy']:.4f}",
                     f"{entry['accuracy'] - keras_accuracy:+.4f}", f"{entry['top1_agreement']:.4f}",
                     f"{entry['max_abs_prob_diff']:.2e}",
                     f"{spec['dtype']} {'normalised' if spec['normalised'] else 'raw pixels'}{quant}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rd_keras.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training workdir with config.json, plain.keras")
    parser.add_argument("--format", default="all", help="saved_model, tflite or all (default)")
    parser.add_argument("--quantize", default="none,fp16,dynamic,int8",
                        help="comma-separated TFLite variants: none, fp16, dynamic, int8 (default: all)")
    parser.add_argument("--qat_steps", type=int, default=0, help="quantisation-aware fine-tune steps "
                        "(0 = no QAT)")
    parser.add_argument("--qat_learning_rate", type=float, default=defaults.QAT_LEARNING_RATE,
                        help="SGD learning rate of QAT")
    parser.add_argument("--model_name", default=defaults.MODEL_NAME, help="TF Serving model name (directory)")
    parser.add_argument("--eval_examples", type=int, default=defaults.EVAL_EXAMPLES,
                        help="evaluation images for the report")
    parser.add_argument("--calibration_examples", type=int, default=defaults.CALIBRATION_EXAMPLES,
                        help="int8 calibration images")
    parser.add_argument("--int8_io", default=defaults.INT8_IO, choices=tflite_export.IO_TYPES,
                        help="output type of the full-integer models (their input is uint8 pixels)")
    parser.add_argument("--new_version", action="store_true",
                        help="write a SavedModel version even when the newest one holds the same weights")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = export_workdir(
            args.workdir, formats=args.format, quantize=args.quantize, qat_steps=args.qat_steps,
            model_name=args.model_name, eval_examples=args.eval_examples,
            calibration_examples=args.calibration_examples, int8_io=args.int8_io,
            qat_learning_rate=args.qat_learning_rate, progress=not args.no_progress,
            new_version=args.new_version)
    except (ValueError, FileNotFoundError, RDError) as e:
        exit_with_error(parser, e)
    print(format_table(report))
    print(f"\nreport: {wd.report_path(args.workdir)}")


if __name__ == "__main__":
    main()
