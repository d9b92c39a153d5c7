"""TF Serving's REST JSON <-> numpy, for the `:predict` verb.

Request bodies (https://www.tensorflow.org/tfx/serving/api_rest#predict_api):
  row format       {"signature_name": "...", "instances": [<instance>, ...]}
                   an instance is a tensor when the signature has one input, else {"<input>": tensor, ...}
  columnar format  {"signature_name": "...", "inputs": <tensor> | {"<input>": tensor, ...}}
Responses: row format -> {"predictions": [...]}, a list of values per instance for a single output and a list
of {"<output>": value} dicts for several; columnar -> {"outputs": <tensor> | {"<output>": tensor}}.
String tensors travel as JSON strings, or as {"b64": "..."} for binary data.

Every conversion is checked against the signature's TensorSpec dtype and never loses information: a float or
out-of-range integer sent to a uint8 input is refused, not rounded or wrapped.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from rd_keras_serving.registry import check_keys, invalid

# numpy's limit on dimensions; deeper nesting is refused before recursing into it (a request must never
# exhaust the interpreter's stack, which would make it an internal error instead of a bad request).
MAX_RANK = 64


def parse_predict_body(body: bytes) -> tuple[str, str, Any]:
    """(signature_name, "instances" | "inputs", payload) from a raw request body."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise invalid(f"Malformed JSON in request body: {error}") from error
    if not isinstance(request, dict):
        raise invalid(f"request body must be a JSON object, got {type(request).__name__}")
    formats = [k for k in ("instances", "inputs") if k in request]
    if len(formats) != 1:
        raise invalid(f"request must have exactly one of 'instances' or 'inputs', got keys {sorted(request)}")
    signature_name = request.get("signature_name", "serving_default")
    if not isinstance(signature_name, str):
        raise invalid(f"signature_name must be a string, got {signature_name!r}")
    return signature_name, formats[0], request[formats[0]]


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _string_array(key: str, value: Any) -> np.ndarray:
    """Nested lists of str / {"b64"} -> object array of bytes, checking the nesting is rectangular."""

    def convert(v, depth=0):
        if isinstance(v, list):
            if depth >= MAX_RANK:
                raise invalid(f"input {key!r} is nested deeper than {MAX_RANK} levels")
            return [convert(x, depth + 1) for x in v]
        if isinstance(v, str):
            return v.encode("utf-8")
        if _is_b64(v) and isinstance(v["b64"], str):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except binascii.Error as error:
                raise invalid(f"input {key!r}: undecodable base64 value: {error}") from error
        raise invalid(f"input {key!r}: expected strings or {{'b64': ...}}, got {v!r:.80}")

    converted = convert(value)
    try:
        # A 1-byte placeholder dtype makes numpy detect ragged nesting; strings are put back afterwards.
        shape = np.array(_shape_probe(converted), dtype=np.int8).shape
    except ValueError as error:
        raise invalid(f"input {key!r} is not a rectangular array: {error}") from error
    array = np.empty(shape, dtype=object)
    array[...] = converted
    return array


def _shape_probe(value: Any) -> Any:
    return [_shape_probe(v) for v in value] if isinstance(value, list) else 0


def to_array(key: str, value: Any, spec: tf.TensorSpec) -> np.ndarray:
    """JSON tensor -> numpy array of exactly `spec.dtype`; INVALID_ARGUMENT if that would lose information."""
    if spec.dtype == tf.string:
        return _string_array(key, value)
    target = np.dtype(spec.dtype.as_numpy_dtype)
    try:
        raw = np.array(value)
    except (ValueError, OverflowError) as error:
        raise invalid(f"input {key!r} is not a rectangular numeric array: {error}") from error
    if raw.size == 0:
        return raw.astype(target)  # the shape check reports the empty batch
    kind = raw.dtype.kind
    if target.kind == "b":
        ok = kind == "b"
    elif target.kind in "iu":
        ok = kind in "iu" and np.iinfo(target).min <= raw.min() and raw.max() <= np.iinfo(target).max
    elif spec.dtype.is_floating or spec.dtype.is_complex:
        ok = kind in "iuf"
    else:
        ok = False
    if not ok:
        raise invalid(
            f"input {key!r} cannot be converted to {spec.dtype.name}: got {raw.dtype} values "
            f"(first: {raw.ravel()[:1].tolist()[0]!r:.80})"
        )
    return raw.astype(target)


def decode_inputs(fmt: str, payload: Any, specs: Mapping[str, tf.TensorSpec]) -> dict[str, np.ndarray]:
    """Row or columnar payload -> {input name: array}, converted with the signature's specs."""
    names = sorted(specs)
    if fmt == "inputs":
        if isinstance(payload, dict) and not _is_b64(payload):
            tensors = payload
        elif len(names) == 1:
            tensors = {names[0]: payload}
        else:
            raise invalid(f"'inputs' must be an object keyed by input name for a signature with inputs {names}")
    else:
        if not isinstance(payload, list):
            raise invalid(f"'instances' must be a list, got {type(payload).__name__}")
        if not payload:
            raise invalid("'instances' is an empty batch")
        named = [isinstance(i, dict) and not _is_b64(i) for i in payload]
        if all(named):
            keys = set(payload[0])
            for index, instance in enumerate(payload):
                if set(instance) != keys:
                    raise invalid(f"instance {index} has inputs {sorted(instance)}, instance 0 has {sorted(keys)}")
            tensors = {k: [instance[k] for instance in payload] for k in keys}
        elif any(named):
            raise invalid("'instances' mixes named (object) and unnamed instances")
        elif len(names) == 1:
            tensors = {names[0]: payload}
        else:
            raise invalid(f"instances must be objects keyed by input name for a signature with inputs {names}")
    check_keys(specs, tensors)
    return {k: to_array(k, v, specs[k]) for k, v in tensors.items()}


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:  # string outputs: text where it is UTF-8, else base64 like TF Serving
        def convert(v):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(v).decode("ascii")}

        return np.vectorize(convert, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def encode_predict_response(fmt: str, outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Numpy outputs -> the TF Serving response body for the request format `fmt`."""
    if fmt == "inputs":
        if len(outputs) == 1:
            return {"outputs": _jsonable(next(iter(outputs.values())))}
        return {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": _jsonable(next(iter(outputs.values())))}
    batches = {v.shape[0] if v.ndim else None for v in outputs.values()}
    if len(batches) != 1 or None in batches:
        shapes = {k: list(v.shape) for k, v in outputs.items()}
        raise invalid(f"outputs do not share a batch dimension, so they cannot be returned as rows: {shapes}")
    columns = {k: _jsonable(v) for k, v in outputs.items()}
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(batches.pop())]}
