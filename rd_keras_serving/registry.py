"""Model versions on disk -> loaded signatures, and the validated predict path shared by gRPC and REST.

A base path in TF Serving layout holds one directory per integer version:

    <base_path>/<version>/saved_model.pb   (+ variables/, assets/, assets.extra/)

`ModelRegistry.poll()` scans every base path and serves the highest version that loads, like TF Serving's
default "latest 1" version policy. Directories whose names are not integers (`.tmp-3`, `3.partial`) and
integer directories without `saved_model.pb` are ignored, so an exporter that writes to a temporary
directory and renames it is never seen half-written. A version that fails to load (or whose warm-up
requests fail) is logged and skipped; the previous version keeps serving, and the load is retried once the
version's files change (a copy still in progress, or a fixed export).

`ModelRegistry.status()` reports every version the registry has tried, the way TF Serving's
GetModelStatus does: LOADING while it loads, AVAILABLE while served, END once replaced by a newer version
(error code OK) or after a failed load (the load's error code and message). Both the gRPC ModelService and
REST `GET /v1/models/<name>` answer from it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Iterable, Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2, saved_model_pb2

from rd_keras_serving import warmup

log = logging.getLogger(__name__)

# TF Serving stores this pseudo-signature in every SavedModel; it is not callable and never listed.
_INIT_OP_SIGNATURE = "__saved_model_init_op"
# TF Serving reads at most this many warm-up records per version.
MAX_WARMUP_RECORDS = 1000


class RequestError(Exception):
    """A request the server refuses; `code` is the gRPC status it maps to (REST maps it to HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """One version's entry in GetModelStatus: names from TF Serving's ModelVersionStatus.State and error codes."""

    version: int
    state: str  # "LOADING", "AVAILABLE" or "END" (the dev server never reports START or UNLOADING)
    error_code: str = "OK"  # tensorflow.error.Code name; not OK only for END after a failed load
    error_message: str = ""


def _load_error_status(version: int, error: Exception) -> VersionStatus:
    """END with the failed load's code: a refused warm-up request keeps its own code, TF errors theirs."""
    if isinstance(error, RequestError):
        return VersionStatus(version, "END", error.code.name, error.message)
    if isinstance(error, tf.errors.OpError):
        return VersionStatus(version, "END", error_codes_pb2.Code.Name(error.error_code), error.message)
    return VersionStatus(version, "END", "UNKNOWN", f"{type(error).__name__}: {error}")


@dataclasses.dataclass(frozen=True)
class ServedVersion:
    """One loaded version. Immutable, so requests can keep using it while a newer one is swapped in."""

    name: str
    version: int
    path: str
    loaded: Any  # the object from tf.saved_model.load; holding it keeps the variables alive
    signatures: Mapping[str, Any]  # name -> ConcreteFunction taking keyword tensors, returning a dict
    input_specs: Mapping[str, Mapping[str, tf.TensorSpec]]
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    warmup_records: int

    def signature(self, signature_name: str):
        if signature_name not in self.signatures:
            raise invalid(
                f"Serving signature key {signature_name!r} not found; model {self.name!r} version "
                f"{self.version} has {sorted(self.signatures)}"
            )
        return self.signatures[signature_name], self.input_specs[signature_name]


def check_shape(key: str, shape: tuple[int, ...], spec: tf.TensorSpec, max_batch_size: int) -> None:
    """Raise INVALID_ARGUMENT unless `shape` fits `spec` and its batch (first dim) is in [1, max_batch_size]."""
    if any(d < 0 for d in shape):
        raise invalid(f"input {key!r} has a negative dimension in shape {list(shape)}")
    if spec.shape.rank is not None:
        expected = spec.shape.as_list()
        if len(shape) != len(expected) or any(e is not None and e != d for e, d in zip(expected, shape)):
            shown = ["None" if e is None else e for e in expected]
            raise invalid(f"input {key!r} has shape {list(shape)}, expected [{', '.join(map(str, shown))}]")
    if shape:
        if shape[0] == 0:
            raise invalid(f"input {key!r} is an empty batch (shape {list(shape)})")
        if shape[0] > max_batch_size:
            raise invalid(f"input {key!r} has batch size {shape[0]}, over max_batch_size={max_batch_size}")


def check_keys(specs: Mapping[str, tf.TensorSpec], keys: Iterable[str]) -> None:
    """INVALID_ARGUMENT unless `keys` are exactly the signature's input names."""
    missing = sorted(set(specs) - set(keys))
    if missing:
        raise invalid(f"missing input(s) {missing}; the signature expects {sorted(specs)}")
    unknown = sorted(set(keys) - set(specs))
    if unknown:
        raise invalid(f"unknown input(s) {unknown}; the signature expects {sorted(specs)}")


def validate_inputs(
    specs: Mapping[str, tf.TensorSpec], inputs: Mapping[str, np.ndarray], max_batch_size: int
) -> None:
    """The checks every request passes before the signature is called (keys, dtype, shape, batch)."""
    check_keys(specs, inputs)
    batches = set()
    for key, spec in specs.items():
        array = inputs[key]
        if spec.dtype == tf.string:
            ok = array.dtype == object and all(isinstance(v, bytes) for v in array.flat)
        else:
            ok = array.dtype == spec.dtype.as_numpy_dtype
        if not ok:
            raise invalid(f"input {key!r} has dtype {array.dtype}, expected {spec.dtype.name}")
        check_shape(key, array.shape, spec, max_batch_size)
        if array.ndim:
            batches.add(array.shape[0])
    if len(batches) > 1:
        raise invalid(f"inputs disagree on the batch size: {sorted(batches)}")


def run_signature(
    served: ServedVersion,
    signature_name: str,
    inputs: Mapping[str, np.ndarray],
    max_batch_size: int,
    output_filter: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Validate `inputs` against the signature's TensorSpecs, call it, and return numpy outputs."""
    function, specs = served.signature(signature_name)
    validate_inputs(specs, inputs, max_batch_size)
    wanted = list(output_filter)
    known = set(function.structured_outputs)
    if set(wanted) - known:
        raise invalid(f"output_filter names unknown output(s) {sorted(set(wanted) - known)}; have {sorted(known)}")
    try:
        outputs = function(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
    except tf.errors.InvalidArgumentError as error:
        # Raised by ops inside the graph, e.g. a reshape that a hand-written signature could not handle.
        raise invalid(error.message) from error
    return {k: v.numpy() for k, v in outputs.items() if not wanted or k in wanted}


def read_signature_defs(path: str) -> dict[str, meta_graph_pb2.SignatureDef]:
    """SignatureDefs straight from saved_model.pb, for GetModelMetadata (what TF Serving reports)."""
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model = saved_model_pb2.SavedModel.FromString(f.read())
    if not saved_model.meta_graphs:
        raise ValueError(f"{path}/saved_model.pb has no meta graph")
    defs = saved_model.meta_graphs[0].signature_def
    return {k: defs[k] for k in sorted(defs) if k != _INIT_OP_SIGNATURE}


def load_version(name: str, version: int, path: str, max_batch_size: int) -> ServedVersion:
    """Load one version and replay its warm-up requests; raises if either fails."""
    loaded = tf.saved_model.load(path)
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ValueError(f"{path} has no serving signatures")
    served = ServedVersion(
        name=name,
        version=version,
        path=path,
        loaded=loaded,
        signatures=signatures,
        input_specs={k: dict(f.structured_input_signature[1]) for k, f in signatures.items()},
        signature_defs=read_signature_defs(path),
        warmup_records=0,
    )
    count = 0
    for request in warmup.read_warmup_requests(path, limit=MAX_WARMUP_RECORDS):
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        run_signature(served, request.model_spec.signature_name or "serving_default", inputs, max_batch_size)
        count += 1
    return dataclasses.replace(served, warmup_records=count)


def _file_stamp(path: str) -> tuple:
    """(relative path, size, mtime) of every file under `path`: changes whenever a copy makes progress."""
    stamp = []
    for root, _, files in os.walk(path):
        for file in files:
            full = os.path.join(root, file)
            try:
                st = os.stat(full)
            except OSError:  # removed while walking; the next poll sees the final state
                continue
            stamp.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(stamp))


def candidate_versions(base_path: str) -> list[int]:
    """Integer-named version directories that contain saved_model.pb, highest first."""
    versions = []
    for entry in os.scandir(base_path):
        if entry.is_dir() and entry.name.isdigit() and os.path.isfile(os.path.join(entry.path, "saved_model.pb")):
            versions.append(int(entry.name))
    return sorted(versions, reverse=True)


class ModelRegistry:
    """The served version of each model, kept current by `poll()`. Safe to use from many threads."""

    def __init__(self, models: Mapping[str, str], max_batch_size: int = 256):
        if not models:
            raise ValueError(f"at least one model is required, got {models!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        self.models = dict(models)
        self.max_batch_size = max_batch_size
        self._served: dict[str, ServedVersion] = {}
        # name -> version -> status of every version ever tried; entries are replaced, never removed, as in
        # TF Serving's ServableStateMonitor, so a replaced or broken version stays visible to status checks.
        self._states: dict[str, dict[int, VersionStatus]] = {name: {} for name in self.models}
        self._lock = threading.Lock()  # guards _served and _states (written by poll, read by requests)
        self._poll_lock = threading.Lock()  # one scan at a time (background thread and explicit calls)
        self._reported: set[tuple[str, str]] = set()  # problems already logged, so polling does not spam
        # path -> file stamp of a version that failed to load: retried only once its files change.
        self._failed: dict[str, tuple] = {}

    def _report_once(self, key: tuple[str, str], message: str, *args) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message, *args)

    def poll(self) -> None:
        """Scan every base path once; load and publish a better version where one appeared."""
        with self._poll_lock:
            for name, base_path in self.models.items():
                self._poll_model(name, base_path)

    def _poll_model(self, name: str, base_path: str) -> None:
        try:
            versions = candidate_versions(base_path)
        except OSError as error:
            self._report_once((name, "base"), "model %r: cannot list base path %s: %s", name, base_path, error)
            return
        current = self._served.get(name)
        if not versions and current is not None:
            self._report_once((name, "empty"), "model %r: no versions left in %s; still serving version %d",
                              name, base_path, current.version)
        for version in versions:
            if current is not None and version == current.version:
                return
            path = os.path.join(base_path, str(version))
            stamp = _file_stamp(path)
            if self._failed.get(path) == stamp:
                continue
            self._set_status(name, VersionStatus(version, "LOADING"))
            try:
                served = load_version(name, version, path, self.max_batch_size)
            except Exception as error:  # any failure must leave the old version serving
                self._failed[path] = stamp
                self._set_status(name, _load_error_status(version, error))
                still = f"version {current.version}" if current else "nothing"
                log.warning("model %r: failed to load %s (%s: %s); still serving %s",
                            name, path, type(error).__name__, error, still)
                continue
            with self._lock:
                self._served[name] = served
                self._states[name][version] = VersionStatus(version, "AVAILABLE")
                if current is not None:  # unloaded cleanly: END with OK, as TF Serving reports it
                    self._states[name][current.version] = VersionStatus(current.version, "END")
            self._reported = {k for k in self._reported if k[0] != name}
            log.info("model %r: serving version %d from %s (%d warm-up requests replayed)",
                     name, version, path, served.warmup_records)
            return

    def _set_status(self, name: str, status: VersionStatus) -> None:
        with self._lock:
            self._states[name][status.version] = status

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Status of every tried version of `name`, highest first, or of `version` only; NOT_FOUND otherwise.

        The messages are TF Serving's, which gives the same answer for an unknown model and for a configured
        model with nothing tried yet.
        """
        with self._lock:
            states = dict(self._states.get(name, {}))
        if version is None:
            if not states:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
            return [states[v] for v in sorted(states, reverse=True)]
        if version not in states:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
        return [states[version]]

    def get(self, name: str, version: int | None = None) -> ServedVersion:
        """The served version of `name` (checked against `version` if given); NOT_FOUND otherwise."""
        if name not in self.models:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found: unknown model {name!r}")
        with self._lock:
            served = self._served.get(name)
        if served is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no loaded version yet")
        if version is not None and version != served.version:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {name!r} version {version} (serving version {served.version})",
            )
        return served
