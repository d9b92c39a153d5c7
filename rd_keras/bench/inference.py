"""`bench inference`: latency and throughput of ResNets, their plain twins and their exact conversions, on
every deployment runtime.

Three rows per pair (random weights: speed does not depend on their values): the ResNet, its plain twin
(what RD trains), and the ResNet's exact conversion (`rd_keras.export.exact`: the same logits without
shortcuts, no training, wider convs). Each classifier is BN-folded (`rd_keras.export.folding.fold`) and
then run four ways:

- `keras`: the folded Keras model called through a `tf.function` in inference mode (TF's own threads);
- `saved_model`: the exported SavedModel (`rd_keras.export.saved_model_export.build_archive`), reloaded with
  `tf.saved_model.load`, signature `predict_preprocessed` (float32 normalised input, softmax output);
- `tflite_fp32`, `tflite_int8`: `.tflite` files from `rd_keras.export.tflite_export.convert` (int8 calibrated on
  random normal images, which sets scales, not speed), run by the LiteRT `Interpreter` with its default
  XNNPACK delegate, with each of `--threads`.

Each timed call is one full request: input copy in, run, output copy out. The three nets of a pair are
timed interleaved in one process, round by round; `speedup` = ResNet time / plain time (> 1: the plain net
is faster) from the medians, `exact_speedup` = exact conversion time / plain time, and `paired_speedup`,
`paired_exact_speedup` the medians of the per-round ratios.
"""

from __future__ import annotations

import gc
import tempfile
import time

import numpy as np

from rd_keras.bench import common

ENGINES = ("keras", "saved_model", "tflite_fp32", "tflite_int8")


def add_arguments(parser):
    common.add_pair_arguments(parser)
    parser.add_argument("--engines", default=",".join(ENGINES), help="subset of %(default)s")
    parser.add_argument("--batch_sizes", default="1,64",
                        help="batch 1 gives latency, larger batches throughput (default: %(default)s)")
    parser.add_argument("--threads", default="1,2", help="TFLite interpreter threads (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=100,
                        help="most timed rounds per measurement (default: %(default)s)")
    parser.add_argument("--min_runs", type=int, default=3,
                        help="fewest timed rounds per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--budget_s", type=float, default=8.0,
                        help="seconds of timed rounds per measurement once --min_runs are done; large "
                             "models thus get fewer runs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-size settings for tests: batch sizes 1,4, warmup 1, 2-5 runs, 1 s budget")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def _settings(args):
    if args.quick:
        args.batch_sizes, args.runs, args.min_runs, args.warmup, args.budget_s = "1,4", 5, 2, 1, 1.0
    settings = {
        "engines": common.parse_choices(args.engines, "--engines", ENGINES),
        "batch_sizes": common.parse_ints(args.batch_sizes, "--batch_sizes"),
        "threads": common.parse_ints(args.threads, "--threads"),
        "runs": int(common.check_positive(args.runs, "--runs")),
        "min_runs": int(common.check_positive(args.min_runs, "--min_runs")),
        "warmup": int(common.check_positive(args.warmup, "--warmup", allow_zero=True)),
        "budget_s": float(common.check_positive(args.budget_s, "--budget_s", allow_zero=True)),
        "quick": bool(args.quick),
    }
    if settings["min_runs"] > settings["runs"]:
        raise common.FlagError(f"--min_runs ({args.min_runs!r}) must not exceed --runs ({args.runs!r}).")
    return settings


# ----------------------------------------------------------------------------- runners


def _keras_runner(folded, shape):
    import tensorflow as tf

    fn = tf.function(lambda x: folded(x, training=False), input_signature=[tf.TensorSpec([None, *shape])])

    def make(batch):
        x = tf.constant(np.random.default_rng(0).standard_normal([batch, *shape], np.float32))
        return lambda: fn(x).numpy()
    return make


def _saved_model_runner(folded, shape, directory):
    import tensorflow as tf

    from rd_keras.export import saved_model_export

    # mean/std only feed the uint8 `serving_default` signature; the timed one takes normalised floats.
    archive = saved_model_export.build_archive(folded, shape, (0.5,) * shape[-1], (0.25,) * shape[-1])
    archive.write_out(directory, verbose=False)
    signature = tf.saved_model.load(directory).signatures["predict_preprocessed"]

    def make(batch):
        x = tf.constant(np.random.default_rng(0).standard_normal([batch, *shape], np.float32))
        return lambda: signature(images=x)["probabilities"].numpy()
    return make


def _tflite_runner(content, shape, threads):
    from ai_edge_litert.interpreter import Interpreter

    from rd_keras.export.quantize import quantize_input

    def make(batch):
        interpreter = Interpreter(model_content=content, num_threads=threads)
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.resize_tensor_input(inp["index"], [batch, *shape])
        interpreter.allocate_tensors()
        # A full-integer model gets what its input contract expects, quantised once up front.
        x = quantize_input(np.random.default_rng(0).standard_normal([batch, *shape], np.float32), inp)

        def call():
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"])
        return call
    return make


def _configs(settings):
    """(label, engine, threads) of every runtime configuration to time."""
    out = []
    for engine in settings["engines"]:
        if engine.startswith("tflite"):
            out += [(f"{engine}_t{t}", engine, t) for t in settings["threads"]]
        else:
            out.append((engine, engine, None))
    return out


def bench_pair(pair, settings, workdir):
    """All measurements of one pair: a list of dicts, one per (runtime configuration, batch size)."""
    from rd_keras import architectures
    from rd_keras.export import exact

    shape = tuple(pair.input_shape)
    folded = pair.deployed(("resnet", "plain"))
    start = time.perf_counter()
    folded["exact"] = exact.convert(folded["resnet"])
    convert_s = time.perf_counter() - start  # all the exact conversion costs instead of training
    params = {side: int(architectures.classifier(pair.build(shortcuts)).count_params())
              for side, shortcuts in (("resnet", "all"), ("plain", "none"))}
    # What is shipped: BN folded into conv biases (the exact conversion has no other form).
    deployed_params = {side: int(model.count_params()) for side, model in folded.items()}
    macs = {side: common.multiply_adds(model) for side, model in folded.items()}
    tflite = {}
    for engine in settings["engines"]:
        if engine.startswith("tflite"):
            quantize = "none" if engine == "tflite_fp32" else "int8"
            tflite[engine] = {side: common.convert_tflite(folded[side], shape, quantize) for side in folded}

    measurements = []
    for label, engine, threads in _configs(settings):
        with tempfile.TemporaryDirectory(prefix="rd_keras-bench-", dir=workdir) as directory:
            makers = {}
            for side in folded:
                if engine == "keras":
                    makers[side] = _keras_runner(folded[side], shape)
                elif engine == "saved_model":
                    makers[side] = _saved_model_runner(folded[side], shape, f"{directory}/{side}")
                else:
                    makers[side] = _tflite_runner(tflite[engine][side], shape, threads)
            for batch in settings["batch_sizes"]:
                calls = {side: makers[side](batch) for side in makers}
                times = common.interleaved(
                    calls, warmup=settings["warmup"], min_runs=settings["min_runs"], max_runs=settings["runs"],
                    budget_s=settings["budget_s"], desc=f"{pair.name} {label} b{batch}")
                entry = {"runtime": label, "engine": engine, "threads": threads, "batch_size": batch,
                         "load_average": common.load_average()}
                for side in common.SIDES:
                    stats = common.summarize(times[side])
                    stats["images_per_s"] = batch / (stats["median_ms"] / 1e3)
                    entry[side] = stats
                entry["speedup"] = entry["resnet"]["median_ms"] / entry["plain"]["median_ms"]
                entry["paired_speedup"] = common.paired_ratio(times["resnet"], times["plain"])
                entry["exact_speedup"] = entry["exact"]["median_ms"] / entry["plain"]["median_ms"]
                entry["paired_exact_speedup"] = common.paired_ratio(times["exact"], times["plain"])
                measurements.append(entry)
                del calls
                gc.collect()
    sizes = {engine: {side: len(content) for side, content in by_side.items()} for engine, by_side in tflite.items()}
    # The speedup that arithmetic alone predicts: the projection convs are the only MACs the plain net drops,
    # and the exact conversion's widened convs are all the MACs it adds.
    macs["ratio"] = macs["resnet"] / macs["plain"]
    macs["exact_ratio"] = macs["exact"] / macs["plain"]
    return {**pair.describe(), "params": params, "deployed_params": deployed_params, "multiply_adds": macs,
            "exact_convert_s": convert_s, "tflite_bytes": sizes, "measurements": measurements}


def table(results) -> str:
    rows = []
    for result in results:
        for m in result["measurements"]:
            latency = m["batch_size"] == 1
            key = "median_ms" if latency else "images_per_s"
            rows.append([result["pair"], m["runtime"], m["batch_size"], "ms" if latency else "img/s",
                         *(m[side][key] for side in common.SIDES), *(m[side]["p90_ms"] for side in common.SIDES),
                         m["speedup"], m["paired_speedup"]["median"], m["exact_speedup"],
                         m["paired_exact_speedup"]["median"], min(m[side]["runs"] for side in common.SIDES)])
    header = ["pair", "runtime", "batch", "unit", "resnet", "plain", "exact", "resnet p90 ms", "plain p90 ms",
              "exact p90 ms", "speedup", "paired", "exact/plain", "paired", "runs"]
    return ("batch 1: median latency (ms); larger batches: throughput (images/s) from the median batch time.\n"
            "plain: the RD plain net; exact: the ResNet's exact conversion (no training).\n"
            "speedup = resnet time / plain time, exact/plain = exact time / plain time (> 1: plain is faster); "
            "paired = median of per-round ratios.\n"
            + common.format_table(rows, header))


def run(args):
    import tensorflow as tf

    load_at_start = common.load_average()
    settings = _settings(args)
    pairs = common.parse_pairs(args.archs, args.width, args.image_size)
    settings["tf_intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads() or "all cores"
    return common.run_pairs("inference", args, pairs, settings, load_at_start, bench_pair, table)
