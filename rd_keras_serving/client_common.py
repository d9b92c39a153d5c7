"""What the gRPC and REST clients share: the error type, the metadata and status summaries, the one-request
module functions and the command line.

Both clients expose the same `Client(host, port, model_name, timeout)` (a `ClientBase`) with
`predict(...)`, `metadata(...)` and `status(...)`, so one implementation of the module functions and of the
command line drives either protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from rd_keras_serving import inputs


class ServingError(RuntimeError):
    """A request that did not produce predictions; the message names the server (host:port).

    `code` is the gRPC status name ("UNAVAILABLE", "INVALID_ARGUMENT", "NOT_FOUND", ...), also for REST.
    """

    def __init__(self, target: str, code: str, detail: str):
        if code == "UNAVAILABLE":
            message = f"TF Serving at {target} is unavailable (is the server running?): {detail}"
        else:
            message = f"TF Serving at {target} refused the request ({code}): {detail}"
        super().__init__(message)
        self.target, self.code, self.detail = target, code, detail


class ClientBase:
    """The arguments both clients take, checked the same way, and the context manager: `with Client(...) as
    c:` closes it at the end (`close` releases what the protocol holds open)."""

    def __init__(self, host: str, port: int, model_name: str, timeout: float = 10.0):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.target = f"{host}:{port}"
        self.model_name, self.timeout = model_name, timeout

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize_metadata(model_spec: dict, signature_def_map: dict) -> dict[str, Any]:
    """Model metadata in the JSON form of ModelSpec and SignatureDefMap -> a compact dict:

    {"name": str, "version": int, "signatures": {name: {"method_name": str,
        "inputs": {key: {"dtype": "DT_UINT8", "shape": [-1, H, W, C] or None}}, "outputs": {...}}}}
    """

    def tensors(infos: dict) -> dict:
        out = {}
        for key, info in infos.items():
            shape = info.get("tensor_shape", {})
            dims = None if shape.get("unknown_rank") else [int(d.get("size", 0)) for d in shape.get("dim", [])]
            out[key] = {"dtype": info.get("dtype", "DT_INVALID"), "shape": dims}
        return out

    signatures = {
        name: {
            "method_name": sig.get("method_name", ""),
            "inputs": tensors(sig.get("inputs", {})),
            "outputs": tensors(sig.get("outputs", {})),
        }
        for name, sig in signature_def_map.get("signature_def", {}).items()
    }
    return {"name": model_spec.get("name", ""), "version": int(model_spec.get("version", 0)), "signatures": signatures}


def summarize_status(reply: dict) -> list[dict[str, Any]]:
    """A GetModelStatusResponse in JSON form (the REST reply, or MessageToDict of the gRPC response) ->

    [{"version": int, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}, ...] in the server's
    order (TF Serving: highest version first). Fields JSON leaves out hold their proto defaults.
    """
    rows = []
    for entry in reply.get("model_version_status", []):
        status = entry.get("status", {})
        rows.append({
            "version": int(entry.get("version", 0)),
            "state": entry.get("state", "UNKNOWN"),
            "error_code": status.get("error_code", "OK"),
            "error_message": status.get("error_message", ""),
        })
    return rows


def one_request_functions(client_class: type, protocol: str) -> tuple[Callable, Callable, Callable]:
    """`predict`, `metadata` and `status` module functions that each open a `client_class` for one request.

    Each client module exports these under its own name, with identical signatures for both protocols.
    """

    def predict(
        images: np.ndarray,
        host: str,
        port: int,
        model_name: str,
        signature_name: str = "serving_default",
        version: int | None = None,
        timeout: float = 10.0,
    ) -> dict[str, np.ndarray]:
        with client_class(host, port, model_name, timeout) as client:
            return client.predict(images, signature_name, version)

    def metadata(host: str, port: int, model_name: str, version: int | None = None, timeout: float = 10.0) -> dict:
        with client_class(host, port, model_name, timeout) as client:
            return client.metadata(version)

    def status(
        host: str, port: int, model_name: str, version: int | None = None, timeout: float = 10.0
    ) -> list[dict]:
        with client_class(host, port, model_name, timeout) as client:
            return client.status(version)

    docs = {
        predict: f"One {protocol} predict request on a fresh connection; use `Client` for many requests.",
        metadata: f"One {protocol} model metadata request (`Client.metadata`).",
        status: f"One {protocol} model status request (`Client.status`).",
    }
    for function, doc in docs.items():
        # Documented, pickled and shown by help() as a function of the client module itself.
        function.__module__, function.__qualname__, function.__doc__ = client_class.__module__, function.__name__, doc
    return predict, metadata, status


def image_shape(metadata: dict, signature_name: str, input_key: str) -> tuple[int, int, int]:
    """(H, W, C) of a uint8 image input, from `summarize_metadata` output."""
    signature = metadata["signatures"].get(signature_name)
    if signature is None:
        raise ValueError(f"signature {signature_name!r} not served; have {sorted(metadata['signatures'])}")
    spec = signature["inputs"].get(input_key)
    if spec is None:
        raise ValueError(f"signature {signature_name!r} has no input {input_key!r}; has {sorted(signature['inputs'])}")
    if spec["dtype"] != "DT_UINT8" or spec["shape"] is None or len(spec["shape"]) != 4 or min(spec["shape"][1:]) < 1:
        raise ValueError(f"the command line sends raw images: input {input_key!r} must be DT_UINT8 "
                         f"[N, H, W, C] with known H, W, C, got {spec}")
    return tuple(spec["shape"][1:])


def parse_server(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--server must be HOST:PORT, got {server!r}")
    return host, int(port)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None, client_class: Callable, protocol: str, default_server: str) -> int:
    """Classify images with a served model and print one line (or one JSON object) per image, or (--status)
    print the model's version states."""
    parser = argparse.ArgumentParser(
        prog=f"python -m rd_keras_serving.{protocol.lower()}_client",
        description=f"Classify images with a model served by TF Serving (or rd_keras_serving.dev_server) over "
        f"{protocol}, or report the state of its versions (--status).",
    )
    parser.add_argument("--server", type=parse_server, default=parse_server(default_server),
                        help=f"HOST:PORT of the {protocol} endpoint (default {default_server})")
    parser.add_argument("--model_name", default="plain")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images_dir", help="folder of image files, resized to the model's input")
    source.add_argument("--idx", help="IDX image file (.gz or raw), e.g. t10k-images-idx3-ubyte.gz")
    source.add_argument("--status", action="store_true",
                        help="print the state of each model version (of --version only, if given) instead of "
                        "classifying; exit status 0 when one is AVAILABLE, 1 otherwise (a health check)")
    parser.add_argument("--limit", type=_positive, help="classify only the first N images")
    parser.add_argument("--batch_size", type=_positive, default=64)
    parser.add_argument("--signature_name", default="serving_default")
    parser.add_argument("--version", type=_positive, help="model version (default: the one being served)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    args = parser.parse_args(argv)
    host, port = args.server
    if args.status:
        return _print_status(client_class, host, port, args)
    try:
        with client_class(host, port, args.model_name, timeout=args.timeout) as client:
            shape = image_shape(client.metadata(args.version), args.signature_name, "images")
            if args.images_dir:
                names, images = inputs.load_image_dir(args.images_dir, shape, args.limit)
            else:
                images = inputs.fit_images(inputs.load_idx(args.idx, args.limit), shape)
                names = [f"{os.path.basename(args.idx)}[{i}]" for i in range(len(images))]
            batches = range(0, len(images), args.batch_size)
            results: dict[str, list[np.ndarray]] = {}
            for start in tqdm(batches, desc="batches", file=sys.stderr, disable=len(batches) < 3):
                outputs = client.predict(images[start:start + args.batch_size], args.signature_name, args.version)
                for key, value in outputs.items():
                    results.setdefault(key, []).append(value)
    except (ServingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if "classes" not in results:
        print(f"error: signature {args.signature_name!r} has no 'classes' output, got {sorted(results)}",
              file=sys.stderr)
        return 1
    classes = np.concatenate(results["classes"])
    probabilities = np.concatenate(results["probabilities"]) if "probabilities" in results else None
    rows = []
    for i, name in enumerate(names):
        row = {"image": name, "class": int(classes[i])}
        if probabilities is not None:
            row["probability"] = float(probabilities[i, classes[i]])
            row["probabilities"] = probabilities[i].tolist()
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['image']}\t{row['class']}" + (f"\t{row['probability']:.4f}" if "probability" in row else ""))
    return 0


def _print_status(client_class: Callable, host: str, port: int, args: argparse.Namespace) -> int:
    try:
        with client_class(host, port, args.model_name, timeout=args.timeout) as client:
            rows = client.status(args.version)
    except (ServingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            failure = "" if row["error_code"] == "OK" else f"\t{row['error_code']}: {row['error_message']}"
            print(f"{args.model_name}\tversion {row['version']}\t{row['state']}{failure}")
    return 0 if any(row["state"] == "AVAILABLE" for row in rows) else 1
