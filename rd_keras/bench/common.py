"""Pieces shared by the `rd_keras.bench` sub-commands: model pairs, interleaved timing, tables, JSON.

A *pair* is a ResNet and its plain twin built with the same spec, input shape, class count and width:
every benchmark compares the two inside one process, so that whatever else the machine is doing hits
both alike. `bench inference` and `bench memory` add a third row (`SIDES`), the ResNet's exact conversion
(`rd_keras.export.exact`): the shortcut-free net that needs no training, which the RD plain net must beat. Timings are interleaved (A B, then B A, ...) rather than run as two blocks, for the same
reason: a slow minute caused by someone else's job then lands on both models instead of one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
from tqdm import tqdm

from rd_keras.errors import FlagError  # noqa: F401

DEFAULT_ARCHS = ("resnet20", "resnet56", "resnet18", "resnet50")
# Native input shape and class count of each stem: CIFAR (32x32 RGB, 10 classes), ImageNet (224, 1000).
NATIVE = {"cifar": ((32, 32, 3), 10), "imagenet": ((224, 224, 3), 1000)}
RESULTS_DIR = os.path.join("docs", "results")
# int8 calibration images: random normal, like the normalised inputs. They set the quantisation scales,
# which change neither the kernels run nor the memory planned, so a few suffice for speed and memory.
CALIBRATION_IMAGES = 4
# The rows of `bench inference` and `bench memory`, and how tables name them. The plain twin stands for the
# RD-trained plain net: speed and memory do not depend on the weights' values.
SIDES = ("resnet", "plain", "exact")
SIDE_LABELS = {"resnet": "ResNet", "plain": "RD plain net", "exact": "exact conversion (no training)"}



@dataclasses.dataclass(frozen=True)
class Pair:
    """A ResNet and its plain twin at one input shape, class count and width."""

    depth: int
    input_shape: tuple
    num_classes: int
    width: float = 1.0

    @property
    def resnet(self) -> str:
        return f"resnet{self.depth}"

    @property
    def plain(self) -> str:
        return f"plain{self.depth}"

    @property
    def name(self) -> str:
        return f"{self.resnet}/{self.plain}"

    def describe(self) -> dict:
        return {"pair": self.name, "resnet": self.resnet, "plain": self.plain,
                "input_shape": list(self.input_shape), "num_classes": self.num_classes, "width": self.width}

    def build(self, shortcuts: str):
        """The dict-output model of one side: `shortcuts="all"` for the ResNet, `"none"` for the plain net."""
        from rd_keras import architectures

        return architectures.build(self.resnet, shortcuts=shortcuts, num_classes=self.num_classes,
                                   input_shape=self.input_shape, width=self.width)

    def deployed(self, sides=SIDES) -> dict:
        """{side: the float32 classifier deployed for it}: the BN-folded ResNet and plain twin, and the exact
        conversion of that same ResNet (random weights)."""
        from rd_keras import architectures
        from rd_keras.export import exact, folding

        resnet = self.build("all") if {"resnet", "exact"} & set(sides) else None
        nets = {"resnet": lambda: folding.fold(architectures.classifier(resnet)),
                "plain": lambda: folding.fold(architectures.classifier(self.build("none"))),
                "exact": lambda: exact.convert(resnet)}
        return {side: nets[side]() for side in sides}


def parse_pairs(archs: str, width: float = 1.0, image_size: int | None = None) -> list[Pair]:
    """`"resnet20,plain56,resnet50"` -> pairs, each at its stem's native input shape and class count.

    Either member's name selects the pair. `image_size` overrides the native height and width.
    """
    from rd_keras import architectures

    if not isinstance(width, (int, float)) or width <= 0:
        raise FlagError(f"--width must be a positive number, got {width!r}.")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise FlagError(f"--image_size must be an integer >= 8, got {image_size!r}.")
    names = [a.strip() for a in str(archs).split(",") if a.strip()]
    if not names:
        raise FlagError(f"--archs must name at least one architecture, got {archs!r}.")
    pairs = []
    for name in names:
        try:
            spec = architectures.get_spec(name)
        except ValueError as e:
            raise FlagError(f"--archs: {e}") from None
        shape, classes = NATIVE[spec.stem]
        if image_size is not None:
            shape = (image_size, image_size, shape[2])
        pair = Pair(spec.depth, tuple(shape), classes, float(width))
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def parse_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    """`"1,64"` -> [1, 64]; every value must be an integer >= `minimum`."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise FlagError(f"{flag} must be comma-separated integers, got {text!r}.") from None
    if not values or any(v < minimum for v in values):
        raise FlagError(f"{flag} must be comma-separated integers >= {minimum}, got {text!r}.")
    return values


def parse_choices(text: str, flag: str, choices) -> list[str]:
    """`"a,b"` -> ["a", "b"], each one of `choices`, in the order given."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if not values or bad:
        raise FlagError(f"{flag} must be a comma-separated subset of {list(choices)}, got {text!r}.")
    return values


def check_positive(value, flag: str, allow_zero: bool = False):
    """Raises unless `value` is a number > 0 (>= 0 with `allow_zero`); returns it."""
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low_ok:
        raise FlagError(f"{flag} must be a number {'>=' if allow_zero else '>'} 0, got {value!r}.")
    return value


# ----------------------------------------------------------------------------- machine and output


def cpu_model() -> str:
    """The CPU model name as `lscpu` prints it (read from /proc/cpuinfo), or platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average():
    """The 1-minute load average (runnable processes), or None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine(argv, load_at_start=None) -> dict:
    """What the numbers were measured on: CPU, core count, accelerators, library versions, date, the
    command (`argv`: the bench arguments), and the load average at the start (`load_at_start`, from
    `load_average()`) and now: above the core count, other processes were competing for the CPU."""
    import keras
    import tensorflow as tf

    try:
        from importlib.metadata import version
        litert = version("ai-edge-litert")
    except Exception:  # not installed: TFLite benchmarks then fail on their own, with a clear error
        litert = None
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": litert,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m rd_keras.bench", *argv]),
    }


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` to `path` (parents created) via a temporary file, so a crash leaves no half file."""
    from rd_keras.workdir import write_atomic

    write_atomic(path, json.dumps(payload, indent=1, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_table(rows: list[list], header: list[str]) -> str:
    """A plain-text table, columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(values, raw):
        out = []
        for i, (text, value) in enumerate(zip(values, raw)):
            numeric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            out.append(text.rjust(widths[i]) if numeric else text.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line(header, header), "  ".join("-" * w for w in widths)]
    lines += [line(c, r) for c, r in zip(cells, rows)]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def multiply_adds(model) -> int:
    """Multiply-accumulates of one image through the convs and dense layers of a functional model: the
    arithmetic that removing shortcuts can save (projection convs) or not (identity shortcuts)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w = layer.output.shape[1:3]
            kernel = layer.kernel.shape  # (kh, kw, in / groups, out)
            total += out_h * out_w * kernel[0] * kernel[1] * kernel[2] * kernel[3]
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def mib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / 2 ** 20


def _ratio(a, b):
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def compare(resnet_value, plain_value, exact_value=None) -> dict:
    """The sides of one figure, `ratio` = resnet / plain, the share of the ResNet's figure that the
    shortcuts cost (1 - plain / resnet), and `exact_ratio` = exact / plain (what the RD plain net saves
    over the exact conversion). None where a side is missing or zero."""
    ratio = _ratio(resnet_value, plain_value)
    return {"resnet": resnet_value, "plain": plain_value, "exact": exact_value,
            "ratio": ratio, "shortcut_share": None if ratio is None else 1.0 - plain_value / resnet_value,
            "exact_ratio": _ratio(exact_value, plain_value)}


# ----------------------------------------------------------------------------- timing


def interleaved(fns: dict, *, warmup: int, min_runs: int, max_runs: int, budget_s: float,
                desc: str = "") -> dict:
    """Times each callable in `fns` round by round, alternating the order (A B, B A, ...).

    After `warmup` untimed rounds (cut short once they took a quarter of the budget), runs at least
    `min_runs` rounds and then more until `max_runs` rounds or `budget_s` seconds of timed rounds,
    whichever comes first: large models get fewer runs. Returns {name: [seconds per call]}, all lists of
    equal length (one entry per round).
    """
    names = list(fns)
    start = time.perf_counter()
    for i in range(warmup):
        # One round already loads caches and plans; later ones only matter for fast models.
        if i and time.perf_counter() - start > budget_s / 4:
            break
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    with tqdm(total=max_runs, desc=desc, leave=False, unit="round", file=sys.stderr) as bar:
        while rounds < max_runs and (rounds < min_runs or time.perf_counter() - start < budget_s):
            for name in (names if rounds % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
            rounds += 1
            bar.update(1)
    return times


def summarize(seconds: list[float]) -> dict:
    """Median, p90, mean and min of a list of durations, in milliseconds, and the run count."""
    ms = np.asarray(seconds, np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "runs": int(ms.size)}


def paired_ratio(resnet_s: list[float], plain_s: list[float]) -> dict:
    """Median and quartiles of the per-round ratios resnet / plain: each round ran both back to back,
    so each ratio saw the same machine load, and their spread shows how much the load moved it."""
    ratios = np.asarray(resnet_s) / np.asarray(plain_s)
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return {"median": float(med), "q25": float(q1), "q75": float(q3)}


def progress(iterable, desc):
    """A tqdm bar on stderr, so the table on stdout stays clean."""
    return tqdm(iterable, desc=desc, file=sys.stderr)


def convert_tflite(folded, shape, quantize):
    """`.tflite` bytes of a folded classifier via `rd_keras.export.tflite_export.convert` ("none" or "int8")."""
    from rd_keras.export import tflite_export

    calibration = None
    if quantize == "int8":
        calibration = np.random.default_rng(0).standard_normal([CALIBRATION_IMAGES, *shape], np.float32)
    return tflite_export.convert(folded, tuple(shape), quantize, calibration=calibration)


def add_pair_arguments(parser):
    """The flags that choose the ResNet/plain pairs: architectures, width and input size."""
    parser.add_argument("--archs", default=",".join(DEFAULT_ARCHS),
                        help="comma-separated architectures; each names its ResNet/plain pair "
                             "(default: %(default)s)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (default: 1.0)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="override the native input size (32 for CIFAR nets, 224 for ImageNet nets)")


def run_pairs(command, args, pairs, settings, load_at_start, bench_pair, table):
    """Runs `bench_pair(pair, settings, workdir)` for each pair, prints `table(results)`, writes `--json`;
    returns the JSON payload."""
    import tempfile

    import keras

    results = []
    with tempfile.TemporaryDirectory(prefix="rd_keras-bench-") as workdir:
        for pair in progress(pairs, "pairs"):
            results.append(bench_pair(pair, settings, workdir))
            keras.backend.clear_session()  # frees the pair's graphs before the next, larger one
    payload = {"command": command, "machine": machine(args.argv, load_at_start), "settings": settings,
               "results": results}
    print(table(results))
    if args.json:
        write_json(args.json, payload)
    return payload


# ----------------------------------------------------------------------------- markdown


def md_cell(v) -> str:
    """One value as the report's tables print it: 3 significant digits, thousands separated, '–' for None."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def md_table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(payload):
    m = payload["machine"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    start, end = m.get("load_average_start"), m.get("load_average_end")
    load_text = (f"; load average {start:.1f} at the start, {end:.1f} at the end"
                 if start is not None and end is not None else "")
    return (f"*Measured {m['date']} on {m['cpu']} ({m['cpu_cores']} cores, {gpus}{load_text}); "
            f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, ai-edge-litert {m['ai_edge_litert']}.*\n"
            f"Command: `{m['command']}`")
