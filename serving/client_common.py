"""What the gRPC and REST clients share: the error type, the metadata summary and the command line.

Both clients expose the same `Client(host, port, model_name, timeout)` with `predict(...)` and
`metadata(...)`, so one command-line implementation drives either protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from serving import inputs


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
    """Classify images with a served model and print one line (or one JSON object) per image."""
    parser = argparse.ArgumentParser(
        prog=f"python -m serving.{protocol.lower()}_client",
        description=f"Classify images with a model served by TF Serving (or serving.dev_server) over {protocol}.",
    )
    parser.add_argument("--server", type=parse_server, default=parse_server(default_server),
                        help=f"HOST:PORT of the {protocol} endpoint (default {default_server})")
    parser.add_argument("--model_name", default="plain")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images_dir", help="folder of image files, resized to the model's input")
    source.add_argument("--idx", help="IDX image file (.gz or raw), e.g. t10k-images-idx3-ubyte.gz")
    parser.add_argument("--limit", type=_positive, help="classify only the first N images")
    parser.add_argument("--batch_size", type=_positive, default=64)
    parser.add_argument("--signature_name", default="serving_default")
    parser.add_argument("--version", type=_positive, help="model version (default: the one being served)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    args = parser.parse_args(argv)
    host, port = args.server
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
