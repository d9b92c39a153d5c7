"""The report's section on the exact conversion: what the RD-trained plain net buys over converting the ResNet.

Reads the `bench inference` and `bench memory` payloads saved as `exact_inference.json` and
`exact_memory.json` (their three rows: ResNet, RD plain net, exact conversion) and writes, per pair, one
table of three rows: parameters, multiply-adds, feature-map memory (liveness, TFLite arena, peak RSS) and
the latency or throughput of every measured runtime, each figure of the ResNet and of the exact conversion
followed by its ratio to the plain net's. Counts (parameters, MACs, bytes) are exact; seconds come from
interleaved rounds on whatever machine ran the commands, and the ratios use the per-round (paired) medians.
"""

from __future__ import annotations

from rd_keras.bench import common
from rd_keras.bench.common import md_table, provenance

FILES = {"exact-inference": "exact_inference.json", "exact-memory": "exact_memory.json"}
TRAINING = {"resnet": "supervised", "plain": "RD (ResNet teacher, then the plain net)", "exact": "none"}
ACCURACY = {"resnet": "reference", "plain": "RD's (see the accuracy sections)",
            "exact": "the ResNet's, by construction"}


def _cell(value, ratio):
    if isinstance(value, str) or value is None or ratio is None:
        return common.md_cell(value)
    return f"{common.md_cell(value)} ({ratio:.2f}x)"


def _memory_columns(result):
    """[(header, {side: value}, {side: ratio to plain})] of one memory result."""
    from rd_keras.bench import memory as bench_memory

    columns = []
    batch = result["batch_size"]
    figures = [(f"liveness fp32 MiB b{batch}", result["liveness"]["fp32"]),
               (f"TFLite arena fp32 MiB b{batch}", result["tflite_arena"]["fp32"]),
               (f"TFLite arena int8 MiB b{batch}", result["tflite_arena"]["int8"])]
    figures += [(f"peak RSS {engine} MiB b{v['batch_size']}", v) for engine, v in result["rss"].items()]
    for header, v in figures:
        values = {side: common.mib(v[side]) if v[side] is not None else (
            bench_memory.BELOW_RESOLUTION if side in v.get("below_resolution", ()) else None)
            for side in common.SIDES}
        columns.append((header, values, {"resnet": v["ratio"], "plain": None, "exact": v["exact_ratio"]}))
    return columns


def _speed_columns(result):
    columns = []
    for m in result["measurements"]:
        latency = m["batch_size"] == 1
        key = "median_ms" if latency else "images_per_s"
        unit = "ms" if latency else "img/s"
        # Ratios of times, plain = 1: > 1 means that row is slower than the plain net.
        columns.append((f"{m['runtime']} b{m['batch_size']} {unit}", {side: m[side][key] for side in common.SIDES},
                        {"resnet": m["paired_speedup"]["median"], "plain": None,
                         "exact": m["paired_exact_speedup"]["median"]}))
    return columns


def pair_table(inference, memory) -> str:
    """The three-row table of one pair; `inference` or `memory` may be None."""
    columns = []
    if inference is not None:
        params, macs = inference["deployed_params"], inference["multiply_adds"]
        columns.append(("params (M)", {side: params[side] / 1e6 for side in common.SIDES},
                        {"resnet": params["resnet"] / params["plain"], "plain": None,
                         "exact": params["exact"] / params["plain"]}))
        columns.append(("MMACs", {side: macs[side] / 1e6 for side in common.SIDES},
                        {"resnet": macs["ratio"], "plain": None, "exact": macs["exact_ratio"]}))
    if memory is not None:
        columns += _memory_columns(memory)
    if inference is not None:
        columns += _speed_columns(inference)
    training = dict(TRAINING)
    if inference is not None:
        training["exact"] = f"none: converted in {inference['exact_convert_s']:.1f} s"
    rows = [[common.SIDE_LABELS[side], training[side], ACCURACY[side],
             *(_cell(values[side], ratios[side]) for _, values, ratios in columns)] for side in common.SIDES]
    return md_table(rows, ["net", "training", "accuracy", *(header for header, _, _ in columns)])


def _load_note(payload) -> str:
    """A warning when other processes competed for the CPU while the times were taken ('' otherwise)."""
    m = payload["machine"]
    loads = [v for v in (m.get("load_average_start"), m.get("load_average_end")) if v is not None]
    if not loads or max(loads) <= m["cpu_cores"]:
        return ""
    return (f"The machine was loaded while these times were taken (load average {min(loads):.1f}-{max(loads):.1f} "
            f"on {m['cpu_cores']} cores: other jobs were running), so single times are noisy; each round timed "
            "the three nets back to back, and the ratios in parentheses are medians of those per-round ratios. "
            "Prefer the counts where the two disagree.")


def section(found) -> str:
    """The section, or '' when neither payload was saved."""
    inference, memory = found.get("exact-inference"), found.get("exact-memory")
    if inference is None and memory is None:
        return ""
    by_pair = {}
    for key, payload in (("inference", inference), ("memory", memory)):
        for result in (payload or {}).get("results", []):
            by_pair.setdefault(result["pair"], {})[key] = result
    parts = ["## The exact conversion against the RD plain net",
             *(provenance(p) for p in (inference, memory) if p is not None),
             "Three nets per architecture, random weights, BN folded: the **ResNet**, the **RD plain net** (its "
             "plain twin: RD trains it, its speed and memory do not depend on the weights' values), and the "
             "ResNet's **exact conversion** (`rd_keras.export.exact`, RMNet: the block inputs carried through "
             "Dirac channels, the same logits without shortcuts, no training). In parentheses: the figure "
             "divided by the plain net's (for times, the median of the per-round ratios; > 1: the plain net "
             "is smaller or faster). Parameters and multiply-adds (per image) are counts, liveness and "
             "arena bytes are exact; peak RSS and times are measurements on the machine above."]
    if inference is not None and _load_note(inference):
        parts.append(_load_note(inference))
    for pair, results in by_pair.items():
        parts += [f"**{pair}** at {tuple(next(iter(results.values()))['input_shape'])}:",
                  pair_table(results.get("inference"), results.get("memory"))]
    return "\n\n".join(parts)
