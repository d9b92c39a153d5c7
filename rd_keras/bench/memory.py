"""`bench memory`: inference feature-map memory of ResNets, their plain twins and their exact conversions,
measured three ways.

Three rows per pair: the ResNet, its plain twin (what RD trains) and the ResNet's exact conversion
(`rd_keras.export.exact`: no shortcuts, no training, wider convs), each BN-folded.

1. `liveness`: the exact liveness walk of the BN-folded classifier (`rd_keras.bench.liveness.feature_map_liveness`,
   conv+ReLU fused as TFLite does, batch `--batch_size`): the peak of bytes held at once, for fp32 (4 bytes
   per value) and int8 (1 byte) feature maps. `two_buffer_bound` is the largest input+output of a single
   layer: a plain chain reaches it with two ping-pong buffers, so it is the floor for both nets.
2. `tflite_arena`: the read-write arena that TFLite's planner lays out for the fp32 and int8 `.tflite`
   files (`rd_keras.bench.liveness.tflite_arena_bytes`, builtin kernels, one thread, batch `--batch_size`):
   feature maps plus kernel scratch (im2col), as a real runtime allocates them.
3. `rss`: the peak growth of a fresh process's resident memory during its first batch-`--rss_batch`
   call (`rd_keras.bench.liveness.peak_rss_delta`), after a batch-1 warm-up, for the Keras/TF runtime and the
   LiteRT runtime (XNNPACK). One process per measurement, so one net's freed memory cannot be reused by
   the other's. It includes whatever the runtime allocates besides feature maps (workspaces, packed
   weights for the new shape): the least clean figure, and the one a server actually pays. Its
   resolution: whatever the runtime, the call holds the input and the output of its largest conv at once
   (no runtime computes a conv in place; `floor` in the JSON). A smaller growth means the call ran in
   memory the process already held, so it measures nothing and is reported as "below resolution" (null
   in the JSON, the reading kept under `raw`). Raise `--rss_batch` to see small nets.

For each: `ratio` = ResNet / plain, and `shortcut_share` = 1 - plain / ResNet, the fraction of the
ResNet's figure that the shortcuts cost. The two are one number seen twice: a share s is a ratio 1/(1-s),
so the paper's ~40% share would be a 1.67x ratio and its 1.25x ratio a 20% share. `exact_ratio` = exact
conversion / plain: what the RD plain net saves over converting the ResNet.
"""

from __future__ import annotations

import math
import multiprocessing
import os

import numpy as np

from rd_keras.bench import common

RSS_ENGINES = ("keras", "tflite_fp32", "tflite_int8")
BELOW_RESOLUTION = "below resolution"


def add_arguments(parser):
    common.add_pair_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=1,
                        help="batch of the liveness walk and the TFLite arena (default: %(default)s)")
    parser.add_argument("--rss_batch", type=int, default=64,
                        help="batch of the peak-RSS run (default: %(default)s)")
    parser.add_argument("--rss_engines", default=",".join(RSS_ENGINES),
                        help="runtimes of the peak-RSS run, a subset of %(default)s; empty: skip it")
    parser.add_argument("--quick", action="store_true", help="for tests: peak RSS of tflite_fp32 only, batch 8")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def _settings(args):
    if args.quick:
        args.rss_engines, args.rss_batch = "tflite_fp32", 8
    return {
        "batch_size": int(common.check_positive(args.batch_size, "--batch_size")),
        "rss_batch": int(common.check_positive(args.rss_batch, "--rss_batch")),
        "rss_engines": common.parse_choices(args.rss_engines, "--rss_engines", RSS_ENGINES)
        if args.rss_engines.strip() else [],
        "quick": bool(args.quick),
    }


# ----------------------------------------------------------------------------- peak RSS, in a fresh process


def _rss_child(job):
    """Runs in a spawned process: warm up at batch 1, then the peak RSS growth of one batch-N call."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rd_keras.bench import liveness as memory

    shape, batch = tuple(job["input_shape"]), job["batch"]
    x = np.random.default_rng(0).standard_normal([batch, *shape], np.float32)
    if job["engine"] == "keras":
        import tensorflow as tf

        pair = common.Pair(job["depth"], shape, job["num_classes"], job["width"])
        folded = pair.deployed([job["side"]])[job["side"]]
        fn = tf.function(lambda t: folded(t, training=False), input_signature=[tf.TensorSpec([None, *shape])])
        fn(tf.constant(x[:1])).numpy()
        big = tf.constant(x)
        return memory.peak_rss_delta(lambda: fn(big).numpy())

    from ai_edge_litert.interpreter import Interpreter

    from rd_keras.export.quantize import quantize_input

    interpreter = Interpreter(model_path=job["tflite_path"], num_threads=1)
    inp = interpreter.get_input_details()[0]
    x = quantize_input(x, inp)
    interpreter.resize_tensor_input(inp["index"], [1, *shape])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x[:1])
    interpreter.invoke()

    def call():
        interpreter.resize_tensor_input(inp["index"], [batch, *shape])
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return memory.peak_rss_delta(call)


def _rss_in_fresh_process(job):
    # spawn, not fork: a forked child would inherit this process's TF runtime and its allocator's pages.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_rss_child, (job,))
        pool.close()  # a clean exit, so no semaphore is left for the resource tracker to complain about
        pool.join()
    return result


# ----------------------------------------------------------------------------- one pair


def _liveness_summary(live):
    return {"peak_bytes": live["peak_bytes"], "peak_step": live["peak_step"],
            "two_buffer_bound": live["two_buffer_lower_bound"],
            "total_activation_bytes": live["total_activation_bytes"]}


def _conv_floor(model, batch, nbytes):
    """Bytes that a batch-`batch` call holds at once on any runtime: its largest conv's input and output."""
    import keras

    return max(batch * nbytes * (math.prod(layer.input.shape[1:]) + math.prod(layer.output.shape[1:]))
               for layer in model.layers if isinstance(layer, keras.layers.Conv2D))


def _rss_figure(values, floors, batch):
    """The peak-RSS comparison of one runtime; a side whose growth is below its floor reads None."""
    measured = {side: values[side] if values[side] >= floors[side] else None for side in values}
    return {**common.compare(*(measured[side] for side in common.SIDES)), "batch_size": batch,
            "raw": values, "floor": floors,
            "below_resolution": [side for side in common.SIDES if measured[side] is None]}


def bench_pair(pair, settings, workdir):
    from rd_keras.bench import liveness as memory

    shape, batch = tuple(pair.input_shape), settings["batch_size"]
    folded, live, tflite_paths = pair.deployed(), {"fp32": {}, "int8": {}}, {}
    arena = {"fp32": {}, "int8": {}}
    floors = {"fp32": {}, "int8": {}}  # at the RSS batch: the peak-RSS run's resolution
    for side, model in folded.items():
        for dtype, nbytes in (("fp32", 4), ("int8", 1)):
            live[dtype][side] = _liveness_summary(
                memory.feature_map_liveness(model, batch_size=batch, dtype_bytes=nbytes))
            floors[dtype][side] = _conv_floor(model, settings["rss_batch"], nbytes)
            content = common.convert_tflite(model, shape, "none" if dtype == "fp32" else "int8")
            path = os.path.join(workdir, f"{side}_{dtype}.tflite")
            with open(path, "wb") as f:
                f.write(content)
            tflite_paths[f"tflite_{dtype}", side] = path
            arena[dtype][side] = memory.tflite_arena_bytes(content, num_threads=1, batch_size=batch)
            del content

    result = {**pair.describe(), "batch_size": batch, "liveness": {}, "tflite_arena": {}, "rss": {}}
    for dtype in ("fp32", "int8"):
        entry = common.compare(*(live[dtype][side]["peak_bytes"] for side in common.SIDES))
        entry["detail"] = live[dtype]
        result["liveness"][dtype] = entry
        result["tflite_arena"][dtype] = common.compare(*(arena[dtype][side] for side in common.SIDES))
    # The floor any net of this shape sequence must pay: both nets share their largest conv's in+out.
    result["liveness"]["plain_two_buffer_bound_fp32"] = live["fp32"]["plain"]["two_buffer_bound"]

    for engine in settings["rss_engines"]:
        values = {}
        for side in common.SIDES:
            job = {"engine": engine, "depth": pair.depth, "side": side, "input_shape": list(shape),
                   "num_classes": pair.num_classes, "width": pair.width, "batch": settings["rss_batch"],
                   "tflite_path": tflite_paths.get((engine, side))}
            values[side] = _rss_in_fresh_process(job)
        dtype = "int8" if engine == "tflite_int8" else "fp32"
        result["rss"][engine] = _rss_figure(values, floors[dtype], settings["rss_batch"])
    return result


def rows(results):
    """(pair, method, resnet MiB, plain MiB, exact MiB, ratio, shortcut share, exact/plain) for every figure
    of every pair; a peak RSS below its resolution reads BELOW_RESOLUTION."""
    def mib(v, side):
        # Files written before the floor was recorded keep a zero growth as it was read: zero is below any
        # call's floor.
        if side in v.get("below_resolution", ()) or v.get(side) == 0:
            return BELOW_RESOLUTION
        return common.mib(v.get(side))

    out = []
    for r in results:
        figures = [(f"liveness {d} b{r['batch_size']}", r["liveness"][d]) for d in ("fp32", "int8")]
        figures += [(f"tflite arena {d} b{r['batch_size']}", r["tflite_arena"][d]) for d in ("fp32", "int8")]
        figures += [(f"rss {e} b{v['batch_size']}", v) for e, v in r["rss"].items()]
        for method, v in figures:
            out.append([r["pair"], method, *(mib(v, side) for side in common.SIDES), v["ratio"],
                        None if v["shortcut_share"] is None else 100 * v["shortcut_share"], v.get("exact_ratio")])
        out.append([r["pair"], f"two-buffer floor fp32 b{r['batch_size']}",
                    None, common.mib(r["liveness"]["plain_two_buffer_bound_fp32"]), None, None, None, None])
    return out


def table(results) -> str:
    header = ["pair", "measure", "resnet MiB", "plain MiB", "exact MiB", "ratio", "shortcut %", "exact/plain"]
    return ("plain: the RD plain net; exact: the ResNet's exact conversion (no training)\n"
            "ratio = resnet / plain; shortcut % = share of the ResNet's figure the shortcuts cost; "
            "exact/plain = exact / plain\n"
            f"{BELOW_RESOLUTION}: a peak-RSS growth smaller than the input + output of the largest conv at that "
            "batch (the call ran in memory the process already held)\n"
            + common.format_table(rows(results), header))


def run(args):
    load_at_start = common.load_average()
    settings = _settings(args)
    pairs = common.parse_pairs(args.archs, args.width, args.image_size)
    return common.run_pairs("memory", args, pairs, settings, load_at_start, bench_pair, table)
