"""Inference memory of feature maps: a liveness walk over Keras graphs and the TFLite runtime's figures.

The paper's memory claim is about activations, not weights: a shortcut keeps a block's input alive
until the Add, so a ResNet holds three feature maps where its plain twin holds two. Three measures:

- `feature_map_liveness(model)`: exact liveness of every tensor of a functional Keras model, in the
  order Keras itself executes the graph, optionally fusing BatchNormalization and ReLU-like layers
  into the conv (or Add) they follow, as the TFLite converter does.
- `tflite_arena_bytes(model)`: the extent of the read-write arena that TFLite's arena planner laid
  out for a `.tflite` model, read back from the tensors' data pointers.
- `peak_rss_delta(fn)`: the peak growth of this process's resident memory while `fn` runs.
"""

import collections
import math
import os
import threading
import time

import keras
import numpy as np
import psutil
# Keras has no public API for the depth of each node of a functional graph (what Function and Model use to
# order their calls): `map_graph` is the function they call themselves.
from keras.src.ops.function import map_graph

# Layers that own a fresh output buffer into which TFLite folds a following BatchNormalization
# (weights absorb it) and a following ReLU/ReLU6/tanh (the kernel's fused activation).
# Every public conv layer (the classes built on keras' private BaseConv, BaseConvTranspose, BaseDepthwiseConv
# and BaseSeparableConv) and Dense.
_FOLDING_ROOTS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Conv1DTranspose,
                  keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose, keras.layers.DepthwiseConv1D,
                  keras.layers.DepthwiseConv2D, keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
                  keras.layers.Dense)
# TFLite's fused activation functions (NONE, RELU, RELU_N1_TO_1, RELU6, TANH); softmax etc. are not.
_FUSABLE_ACTIVATIONS = {"linear", "relu", "relu6", "tanh"}
_RSS_SAMPLE_S = 0.001


def _fusion_kind(op):
    """'bn', 'act' or None: how `op` can merge into the buffer of the op producing its input."""
    if isinstance(op, keras.layers.BatchNormalization):
        return "bn"
    if isinstance(op, keras.layers.ReLU):
        plain = op.negative_slope == 0 and op.threshold == 0 and op.max_value in (None, 6)
        return "act" if plain else None
    if isinstance(op, keras.layers.Activation):
        name = keras.activations.serialize(op.activation)
        return "act" if name in _FUSABLE_ACTIVATIONS else None
    return None


def _fusion_allowed(op):
    """Which fusion kinds a fresh output buffer of `op` still accepts."""
    if isinstance(op, _FOLDING_ROOTS):
        return {"bn", "act"}
    if isinstance(op, keras.layers.Add):
        # An Add carries a fused activation in TFLite, but BN after it cannot be folded into weights.
        return {"act"}
    return set()


def _select_outputs(model, outputs):
    struct = model._outputs_struct
    if outputs is None:
        if isinstance(struct, dict) and "logits" in struct:
            outputs = ["logits"]
        else:
            return list(model.outputs)
    if outputs == "all":
        return list(model.outputs)
    if isinstance(outputs, str) or not isinstance(struct, dict):
        raise ValueError(
            f"outputs must be None, 'all' or a list of keys of a dict-output model; got {outputs!r} "
            f"for a model whose output is a {type(struct).__name__}"
        )
    missing = [k for k in outputs if k not in struct]
    if missing or not outputs:
        raise ValueError(f"outputs={outputs!r}: unknown keys {missing}; the model has {sorted(struct)}")
    return [struct[k] for k in outputs]


def _tensor_bytes(tensor, batch_size, dtype_bytes):
    dims = tuple(tensor.shape)[1:]
    if any(d is None for d in dims):
        raise ValueError(f"tensor {tensor.name!r} has an unknown non-batch dimension: shape {tensor.shape}")
    return math.prod(dims) * batch_size * dtype_bytes


def _execution_order(inputs, outputs):
    """The nodes in the order `Function._run_through_graph` calls them: decreasing depth, then list order.

    Depths are recomputed for the selected outputs only, exactly as Keras does when a model is built
    on those outputs (the exported classifier is such a model).
    """
    _, nodes_by_depth, _, _ = map_graph(inputs, outputs)
    return [
        node
        for depth in sorted(nodes_by_depth, reverse=True)
        for node in nodes_by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def feature_map_liveness(model, batch_size=1, dtype_bytes=4, fuse=True, outputs=None):
    """Exact feature-map liveness of a functional Keras model, one step per executed layer.

    A buffer is allocated when its producer runs and freed right after its last consumer ran; during
    a step its inputs and its output are live together. Model outputs stay live to the end, so by
    default a dict-output model is restricted to its 'logits' (what inference deploys); pass
    `outputs="all"` or a list of keys to keep others. With `fuse`, a BatchNormalization or ReLU-like
    layer that is the only consumer of a conv's (or, activation only, an Add's) output writes in
    place into that buffer and joins the producer's step. A nested model counts as one opaque layer.

    Returns a dict: `peak_bytes`; `peak_step` (names of the layers of the first step reaching the peak,
    joined by '+') and `peak_index`; `steps`, a list of (step name, live bytes) starting with the input
    layers; `total_activation_bytes` (every buffer, input included, as if nothing were freed); and
    `two_buffer_lower_bound`, the max over steps of input plus output bytes, which a chain of layers
    with two ping-pong buffers reaches exactly.
    """
    if isinstance(model, keras.Sequential) and model._functional is not None:
        model = model._functional  # a built Sequential runs through this functional graph
    if not isinstance(model, keras.Model) or not hasattr(model, "_outputs_struct"):
        raise TypeError(f"model must be a functional keras.Model or a built Sequential; got {model!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, int) or dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be a positive int; got {dtype_bytes!r}")

    inputs = list(model.inputs)
    selected = _select_outputs(model, outputs)
    order = _execution_order(inputs, selected)

    consumers = collections.defaultdict(list)  # id(tensor) -> consuming nodes, each once
    for node in order:
        for tid in dict.fromkeys(id(t) for t in node.input_tensors):
            consumers[tid].append(node)
    output_ids = {id(t) for t in selected}

    buffer_of = {}  # id(tensor) -> id of the tensor whose buffer holds it
    size = {}  # buffer -> bytes
    allowed = {}  # buffer -> fusion kinds it still accepts
    names, step_inputs, step_outputs = [], [], []
    step_of_buffer = {}
    for t in inputs:
        buffer_of[id(t)] = id(t)
        size[id(t)] = _tensor_bytes(t, batch_size, dtype_bytes)
        allowed[id(t)] = set()
    names.append("+".join(t._keras_history.operation.name for t in inputs))
    step_inputs.append([])
    step_outputs.append([id(t) for t in inputs])

    for node in order:
        ins, outs = node.input_tensors, node.outputs
        if fuse and len(ins) == 1 and len(outs) == 1:
            src = ins[0]
            buf = buffer_of[id(src)]
            kind = _fusion_kind(node.operation)
            # An in-place op must be the only reader of its input, and must not overwrite a model output.
            if kind in allowed[buf] and consumers[id(src)] == [node] and id(src) not in output_ids:
                buffer_of[id(outs[0])] = buf
                allowed[buf] = {"act"} if kind == "bn" else set()
                names[step_of_buffer[buf]] += "+" + node.operation.name
                continue
        step = len(names)
        names.append(node.operation.name)
        step_inputs.append(list(dict.fromkeys(buffer_of[id(t)] for t in ins)))
        step_outputs.append([id(t) for t in outs])
        for t in outs:
            buffer_of[id(t)] = id(t)
            size[id(t)] = _tensor_bytes(t, batch_size, dtype_bytes)
            allowed[id(t)] = set(_fusion_allowed(node.operation))
            step_of_buffer[id(t)] = step

    # A buffer dies after the last step reading it; one nobody reads dies after the step writing it.
    last_use = {buf: step for step, bufs in enumerate(step_outputs) for buf in bufs}
    for step, bufs in enumerate(step_inputs):
        for buf in bufs:
            last_use[buf] = step
    held = {buffer_of[tid] for tid in output_ids}
    frees = collections.defaultdict(list)
    for buf, step in last_use.items():
        if buf not in held:
            frees[step].append(buf)

    live, steps, bound = 0, [], 0
    for step, name in enumerate(names):
        out_bytes = sum(size[b] for b in step_outputs[step])
        live += out_bytes
        steps.append((name, live))
        bound = max(bound, out_bytes + sum(size[b] for b in step_inputs[step]))
        live -= sum(size[b] for b in frees[step])
    peak_index = max(range(len(steps)), key=lambda i: (steps[i][1], -i))
    return {
        "peak_bytes": steps[peak_index][1],
        "peak_step": steps[peak_index][0],
        "peak_index": peak_index,
        "steps": steps,
        "total_activation_bytes": sum(size.values()),
        "two_buffer_lower_bound": bound,
    }


def shortcut_share(resnet, plain, **kwargs):
    """Compare the liveness peaks of a ResNet and its plain twin; `kwargs` go to `feature_map_liveness`.

    `shortcut_share` is the fraction of the ResNet's peak that the shortcuts are responsible for.
    """
    resnet_peak = feature_map_liveness(resnet, **kwargs)["peak_bytes"]
    plain_peak = feature_map_liveness(plain, **kwargs)["peak_bytes"]
    return {
        "resnet_peak": resnet_peak,
        "plain_peak": plain_peak,
        "ratio": resnet_peak / plain_peak,
        "shortcut_share": 1.0 - plain_peak / resnet_peak,
    }


def _tflite_content(model):
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    raise TypeError(f"expected a .tflite path or its bytes; got {type(model).__name__}")


def _const_and_persistent_tensors(content, interpreter):
    """Model tensors that live outside the read-write arena: weights, variables, decoded weights.

    Weights sit in the model buffer; variables and the outputs of DEQUANTIZE over weights (fp16
    models) go to the persistent arena, which TFLite allocates separately.
    """
    from ai_edge_litert import schema_py_generated as schema

    fb = schema.Model.GetRootAs(content, 0)
    graph = fb.Subgraphs(0)
    outside = set()
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        buf = fb.Buffers(tensor.Buffer())
        # Offset() > 1 marks data stored after the flatbuffer (models over 2 GB).
        if buf.DataLength() > 0 or buf.Offset() > 1 or tensor.IsVariable():
            outside.add(i)
    raw = interpreter._interpreter
    for n in range(raw.NumNodes()):
        if raw.NodeName(n) == "DEQUANTIZE" and all(int(i) in outside for i in raw.NodeInputs(n)):
            outside.update(int(i) for i in raw.NodeOutputs(n))
    return outside, graph.TensorsLength()


def _tensor_interval(interpreter, index):
    """(address, bytes) of an allocated tensor, or None; checks the shape first because reading the
    data of a shapeless kernel temporary crashes the interpreter."""
    raw = interpreter._interpreter
    try:
        shape = [int(d) for d in raw.TensorSize(index, 0)]
    except ValueError:
        return None
    nbytes = math.prod(shape) * np.dtype(raw.TensorType(index, 0)).itemsize
    if nbytes == 0:
        return None
    try:
        view = interpreter.tensor(index)()
    except ValueError:  # no data: delegated away or never allocated
        return None
    return view.__array_interface__["data"][0], nbytes


def tflite_arena_bytes(model, num_threads=1, batch_size=None):
    """Size of the read-write tensor arena TFLite plans for `model` (a path or the flatbuffer bytes).

    The interpreter runs the builtin kernels without the default XNNPACK delegate: a delegate keeps
    its intermediate tensors in its own workspace, invisible here. After `allocate_tensors()` every
    feature map and kernel temporary (im2col buffers included) points into one arena in which the
    planner reuses memory; the figure is the span from the lowest to the highest byte in use, read from
    the tensors' data pointers. Weights, variables and decoded fp16 weights are outside it. TFLite
    keeps the graph's inputs and outputs for the whole invocation, and `num_threads` picks the conv
    kernel (one thread: im2col scratch, often the largest tensor), so compare figures at equal
    settings. `batch_size` resizes every input's first dimension first. None when no arena tensor
    has data.
    """
    from ai_edge_litert import interpreter as litert

    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int; got {num_threads!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int; got {batch_size!r}")
    content = _tflite_content(model)
    interpreter = litert.Interpreter(
        model_content=content,
        num_threads=num_threads,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    if batch_size is not None:
        for detail in interpreter.get_input_details():
            interpreter.resize_tensor_input(detail["index"], [batch_size, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    outside, num_model_tensors = _const_and_persistent_tensors(content, interpreter)

    feature_maps, temporaries = [], []
    for index in range(interpreter._interpreter.NumTensors(0)):
        if index in outside:
            continue
        interval = _tensor_interval(interpreter, index)
        if interval is not None:
            (feature_maps if index < num_model_tensors else temporaries).append(interval)
    if not feature_maps:
        return None
    lo = min(a for a, _ in feature_maps)
    hi = max(a + n for a, n in feature_maps)
    # Kernel temporaries may be arena or persistent tensors, which Python cannot tell apart. Arena
    # ones lie in the feature maps' arena, whose holes are smaller than its largest tensor; the
    # persistent arena is a separate allocation elsewhere in the address space.
    reach = max(n for _, n in feature_maps + temporaries)
    pending = sorted(temporaries)
    grown = True
    while grown:
        grown = False
        for interval in list(pending):
            start, nbytes = interval
            if start < hi + reach and start + nbytes > lo - reach:
                lo, hi = min(lo, start), max(hi, start + nbytes)
                pending.remove(interval)
                grown = True
    return hi - lo


def _current_rss():
    return psutil.Process().memory_info().rss


def _reset_hwm():
    """Reset this process's peak-RSS counter (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status")


def peak_rss_delta(fn, method="auto"):
    """Peak increase of this process's resident set size while `fn()` runs, in bytes.

    `ru_maxrss` only ever grows, so it cannot measure a second call. On Linux the kernel's own peak
    counter (VmHWM) can be reset by writing 5 to /proc/self/clear_refs; it sees every page touched,
    however briefly. Where that is refused (`method="auto"` checks), a thread samples the RSS every
    millisecond, which can miss a spike shorter than that; it samples once more after `fn` returns
    while its result is still referenced. Memory that other threads touch meanwhile counts too.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    if method not in ("auto", "hwm", "sample"):
        raise ValueError(f"method must be 'auto', 'hwm' or 'sample'; got {method!r}")
    reset = method != "sample" and _reset_hwm()
    if method == "hwm" and not reset:
        raise RuntimeError("method='hwm': /proc/self/clear_refs cannot reset the peak RSS here")

    if reset:
        baseline = _current_rss()
        result = fn()
        peak = _vm_hwm_bytes()
        del result
        return max(0, peak - baseline)

    baseline = _current_rss()
    sampled = baseline
    done = threading.Event()

    def sample():
        nonlocal sampled
        while not done.is_set():
            sampled = max(sampled, _current_rss())
            time.sleep(_RSS_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
        final = _current_rss()
    finally:
        done.set()
        sampler.join()
    del result
    return max(0, max(sampled, final) - baseline)
