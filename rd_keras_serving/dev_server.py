"""A small TF Serving-compatible server for development and tests (production uses tensorflow_model_server).

It speaks the same protocols as TF Serving, so the clients and any other TF Serving client work unchanged:
  gRPC  tensorflow.serving.PredictionService/Predict and /GetModelMetadata,
        tensorflow.serving.ModelService/GetModelStatus
  REST  POST /v1/models/<name>[/versions/<v>]:predict   GET /v1/models/<name>[/versions/<v>][/metadata]
It serves the highest integer version under each model's base path and picks up new versions while running
(see rd_keras_serving/registry.py). Bad requests get INVALID_ARGUMENT (HTTP 400), unknown models or versions
NOT_FOUND (HTTP 404); the server itself never goes down for a request.

    python -m rd_keras_serving.dev_server --model_base_path=W/export/saved_model/plain --model_name=plain
    python -m rd_keras_serving.dev_server --model_config_file=my_models.config --port=8500 --rest_api_port=8501
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import logging
import os
import re
import signal
import threading
from typing import Mapping, Sequence

import grpc
import tensorflow as tf
from google.protobuf import json_format, text_format, wrappers_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from rd_keras_serving import json_codec
from rd_keras_serving.registry import (
    ModelRegistry,
    RequestError,
    ServedVersion,
    check_keys,
    check_shape,
    invalid,
    run_signature,
)

log = logging.getLogger(__name__)

# What TF Serving allows by default (INT_MAX); the batch limit, not the transport, bounds a request.
MAX_MESSAGE_BYTES = 2**31 - 1
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_REST_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict|/metadata)?$")


def read_model_config(path: str) -> dict[str, str]:
    """model name -> base path from a TF Serving `--model_config_file` (text ModelServerConfig)."""
    with open(path) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    if not config.HasField("model_config_list") or not config.model_config_list.config:
        raise ValueError(f"{path}: expected a non-empty model_config_list")
    models = {}
    for entry in config.model_config_list.config:
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{path}: model {entry.name!r} has model_platform {entry.model_platform!r}, "
                             "only 'tensorflow' is served")
        if not entry.name or not entry.base_path or entry.name in models:
            raise ValueError(f"{path}: every config needs a unique name and a base_path, got {entry.name!r}")
        if entry.model_version_policy.WhichOneof("policy_choice") not in (None, "latest"):
            log.warning("%s: model %r: only the latest version is served (the dev server ignores %s)",
                        path, entry.name, entry.model_version_policy.WhichOneof("policy_choice"))
        models[entry.name] = entry.base_path
    return models


def metadata_response(served: ServedVersion) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse(
        model_spec=model_pb2.ModelSpec(name=served.name, version=wrappers_pb2.Int64Value(value=served.version))
    )
    response.metadata["signature_def"].Pack(get_model_metadata_pb2.SignatureDefMap(signature_def=served.signature_defs))
    return response


def requested_version(model_spec: model_pb2.ModelSpec) -> int | None:
    """The version a ModelSpec asks for (None: the served one); labels are refused, the dev server has none."""
    if model_spec.version_label:
        raise invalid(f"version labels are not supported by the dev server, got {model_spec.version_label!r}")
    return model_spec.version.value if model_spec.HasField("version") else None


def status_response(
    registry: ModelRegistry, name: str, version: int | None
) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatusResponse for gRPC and, as JSON, for REST `GET /v1/models/<name>[/versions/<v>]`."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for entry in registry.status(name, version):
        response.model_version_status.add(
            version=entry.version,
            state=entry.state,
            # Set even when OK, so the JSON form carries "status" as TF Serving's does.
            status=status_pb2.StatusProto(error_code=entry.error_code, error_message=entry.error_message),
        )
    return response


def _serve(context: grpc.ServicerContext, handler, request):
    """`handler(request)`, with a RequestError (or a server bug, as INTERNAL) turned into the RPC's status."""
    # context.abort raises; calling it outside the try keeps that exception from counting as a server bug.
    try:
        return handler(request)
    except RequestError as error:
        failure = error
    except Exception as error:  # a server bug must fail one request, not the process
        log.exception("internal error")
        failure = RequestError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
    context.abort(failure.code, failure.message)


def _decode_tensor(key: str, proto, spec: tf.TensorSpec, max_batch_size: int):
    """TensorProto -> numpy, checking dtype and declared shape first so a bogus shape is never allocated."""
    if proto.dtype != spec.dtype.as_datatype_enum:
        raise invalid(f"input {key!r} has dtype {types_pb2.DataType.Name(proto.dtype)}, expected "
                      f"{types_pb2.DataType.Name(spec.dtype.as_datatype_enum)}")
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"input {key!r} has an unknown rank")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    check_shape(key, shape, spec, max_batch_size)
    try:
        array = tf.make_ndarray(proto)
    except (ValueError, TypeError) as error:
        raise invalid(f"input {key!r} could not be decoded as a {list(shape)} tensor: {error}") from error
    if array.shape != shape:
        raise invalid(f"input {key!r} declares shape {list(shape)} but holds {list(array.shape)}")
    return array


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC PredictionService over a ModelRegistry (Predict and GetModelMetadata)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def Predict(self, request, context):
        return _serve(context, self._predict, request)

    def GetModelMetadata(self, request, context):
        return _serve(context, self._metadata, request)

    def _served(self, model_spec) -> ServedVersion:
        return self.registry.get(model_spec.name, requested_version(model_spec))

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        served = self._served(request.model_spec)
        signature_name = request.model_spec.signature_name or "serving_default"
        _, specs = served.signature(signature_name)
        check_keys(specs, request.inputs)
        inputs = {
            k: _decode_tensor(k, proto, specs[k], self.registry.max_batch_size)
            for k, proto in request.inputs.items()
        }
        outputs = run_signature(served, signature_name, inputs, self.registry.max_batch_size, request.output_filter)
        response = predict_pb2.PredictResponse(
            model_spec=model_pb2.ModelSpec(
                name=served.name, version=wrappers_pb2.Int64Value(value=served.version), signature_name=signature_name
            )
        )
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def _metadata(self, request):
        served = self._served(request.model_spec)
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise invalid(f"metadata_field must be ['signature_def'] (the only metadata served), got {fields}")
        return metadata_response(served)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """gRPC ModelService: GetModelStatus. HandleReloadConfigRequest stays UNIMPLEMENTED (config is fixed)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def GetModelStatus(self, request, context):
        return _serve(context, self._status, request)

    def _status(self, request: get_model_status_pb2.GetModelStatusRequest):
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")  # TF Serving's message
        spec = request.model_spec
        return status_response(self.registry, spec.name, requested_version(spec))


class _RestHandler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST API. `self.server.registry` is the ModelRegistry."""

    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving; every reply carries Content-Length
    max_body_bytes = 1 << 30

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # the body's end is unknown, so the connection cannot be reused
            raise invalid(f"a Content-Length header is required, got {length!r}")
        if int(length) > self.max_body_bytes:
            self.close_connection = True
            raise invalid(f"request body of {length} bytes is over the {self.max_body_bytes}-byte limit")
        return self.rfile.read(int(length))

    def _dispatch(self, method: str) -> None:
        try:
            # Read the body first, whatever the route, so a refused request leaves the connection reusable.
            body = self._read_body() if method == "POST" else b""
            status, reply = 200, self._route(method, body)
        except RequestError as error:
            status, reply = _HTTP_STATUS.get(error.code, 500), {"error": error.message}
        except Exception as error:  # a server bug must fail one request, not the process
            log.exception("internal error on %s %s", method, self.path)
            status, reply = 500, {"error": f"{type(error).__name__}: {error}"}
        self._reply(status, reply)

    def _route(self, method: str, body: bytes) -> dict:
        match = _REST_PATH.match(self.path)
        verb = match and match["verb"]
        if not match or (method == "POST") != (verb == ":predict"):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {self.path}")
        registry: ModelRegistry = self.server.registry
        version = int(match["version"]) if match["version"] else None
        if verb is None:  # TF Serving prints every field, defaults included ("error_code": "OK")
            return json_format.MessageToDict(status_response(registry, match["name"], version),
                                             always_print_fields_with_no_presence=True)
        served = registry.get(match["name"], version)
        if verb == "/metadata":  # TF Serving's layout: the SignatureDefMap unpacked, without an "@type"
            return {
                "model_spec": json_format.MessageToDict(
                    model_pb2.ModelSpec(name=served.name, version=wrappers_pb2.Int64Value(value=served.version)),
                    preserving_proto_field_name=True,
                ),
                "metadata": {"signature_def": json_format.MessageToDict(
                    get_model_metadata_pb2.SignatureDefMap(signature_def=served.signature_defs),
                    preserving_proto_field_name=True,
                )},
            }
        signature_name, fmt, payload = json_codec.parse_predict_body(body)
        _, specs = served.signature(signature_name)
        inputs = json_codec.decode_inputs(fmt, payload, specs)
        outputs = run_signature(served, signature_name, inputs, registry.max_batch_size)
        return json_codec.encode_predict_response(fmt, outputs)


class _HttpServer(http.server.ThreadingHTTPServer):
    """One thread per connection; a deeper accept queue than the default 5 for bursts of clients."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], registry: ModelRegistry):
        super().__init__(address, _RestHandler)
        self.registry = registry


class DevServer:
    """gRPC + REST servers and a polling thread over one ModelRegistry. Port 0 picks a free port.

    `start()` loads what is on disk before returning, then polls every `poll_seconds`; the bound ports are in
    `grpc_port` and `rest_port` afterwards. Usable as a context manager.
    """

    def __init__(
        self,
        models: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 8500,
        rest_port: int = 8501,
        max_batch_size: int = 256,
        poll_seconds: float = 1.0,
        grpc_threads: int = 16,
    ):
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds!r}")
        if grpc_threads < 1:
            raise ValueError(f"grpc_threads must be >= 1, got {grpc_threads!r}")
        self.registry = ModelRegistry(models, max_batch_size)
        self.host, self.grpc_port, self.rest_port = host, grpc_port, rest_port
        self.poll_seconds, self.grpc_threads = poll_seconds, grpc_threads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._grpc = self._http = None

    def start(self) -> "DevServer":
        self.registry.poll()
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(self.grpc_threads, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.registry), self._grpc
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry), self._grpc)
        address = f"{self.host}:{self.grpc_port}"
        try:
            self.grpc_port = self._grpc.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot bind the gRPC port at {address}: {error}") from error
        if not self.grpc_port:  # older grpc versions report a failed bind by returning 0
            raise OSError(f"cannot bind the gRPC port at {address}")
        self._http = _HttpServer((self.host, self.rest_port), self.registry)
        self.rest_port = self._http.server_address[1]
        self._grpc.start()
        self._threads = [
            threading.Thread(target=self._http.serve_forever, name="rest", daemon=True),
            threading.Thread(target=self._poll_forever, name="poll", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("gRPC on %s:%d, REST on %s:%d, models %s",
                 self.host, self.grpc_port, self.host, self.rest_port, self.registry.models)
        return self

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.registry.poll()
            except Exception:  # keep polling: a bad scan must not freeze the served version forever
                log.exception("polling failed")

    def stop(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> "DevServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rd_keras_serving.dev_server",
        description="TF Serving-compatible development server (gRPC Predict/GetModelMetadata/GetModelStatus "
        "and REST). "
        "For development and tests; production uses tensorflow_model_server, see rd_keras_serving/README.md.",
    )
    parser.add_argument("--model_base_path", help="directory holding integer version subdirectories")
    parser.add_argument("--model_name", default="default", help="name of the model at --model_base_path")
    parser.add_argument("--model_config_file", help="TF Serving model_config_list text proto (several models)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: pick a free one)")
    parser.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server")
    parser.add_argument("--max_batch_size", type=int, default=256, help="largest batch a request may carry")
    parser.add_argument("--poll_seconds", "--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="how often the base paths are scanned for new versions")
    parser.add_argument("--grpc_threads", type=int, default=16, help="gRPC worker threads")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if bool(args.model_base_path) == bool(args.model_config_file):
        parser.error("give exactly one of --model_base_path or --model_config_file, got "
                     f"--model_base_path={args.model_base_path!r} --model_config_file={args.model_config_file!r}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_config_file:
        models = read_model_config(args.model_config_file)
    else:
        models = {args.model_name: os.path.abspath(args.model_base_path)}
    server = DevServer(models, host=args.host, grpc_port=args.port, rest_port=args.rest_api_port,
                       max_batch_size=args.max_batch_size, poll_seconds=args.poll_seconds,
                       grpc_threads=args.grpc_threads).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    log.info("stopping")
    server.stop()


if __name__ == "__main__":
    main()
