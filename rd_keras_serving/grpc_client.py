"""gRPC client for TF Serving's PredictionService and ModelService (tensorflow_model_server or the dev server,
rd_keras_serving.dev_server).

    from rd_keras_serving import grpc_client
    outputs = grpc_client.predict(images_uint8, "127.0.0.1", 8500, "plain")
    outputs["classes"], outputs["probabilities"]
    grpc_client.status("127.0.0.1", 8500, "plain")  # [{"version": 1, "state": "AVAILABLE", ...}]

    python -m rd_keras_serving.grpc_client --server=127.0.0.1:8500 --model_name=plain --idx=t10k-images-idx3-ubyte.gz \
        --limit=100 [--batch_size=64] [--json]
    python -m rd_keras_serving.grpc_client --server=127.0.0.1:8500 --model_name=plain --status [--version=N] [--json]

Failures raise `ServingError` naming host:port: UNAVAILABLE when nothing answers there, the server's own
detail (e.g. INVALID_ARGUMENT: wrong shape) when the request is refused.
"""

from __future__ import annotations

import sys
from typing import Sequence

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format, wrappers_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from rd_keras_serving import client_common
from rd_keras_serving.client_common import ServingError

# TF Serving accepts up to INT_MAX bytes; the client must allow as much for large batches of outputs.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


class Client(client_common.ClientBase):
    """One channel to one server and model; reuse it for many requests. A context manager."""

    def __init__(self, host: str, port: int, model_name: str, timeout: float = 10.0):
        super().__init__(host, port, model_name, timeout)
        self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _model_spec(self, signature_name: str = "", version: int | None = None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature_name)
        if version is not None:
            spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
        return spec

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise ServingError(self.target, error.code().name, error.details()) from None

    def predict(
        self,
        images: np.ndarray,
        signature_name: str = "serving_default",
        version: int | None = None,
        input_key: str = "images",
    ) -> dict[str, np.ndarray]:
        """Outputs of `signature_name` for `images` (sent as-is: uint8 for serving_default), as numpy arrays."""
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(signature_name, version))
        request.inputs[input_key].CopyFrom(tf.make_tensor_proto(np.asarray(images)))
        response = self._call(self._stub.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def metadata(self, version: int | None = None) -> dict:
        """Signatures of the served model, in the form of `client_common.summarize_metadata`."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(version=version), metadata_field=["signature_def"]
        )
        response = self._call(self._stub.GetModelMetadata, request)
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)
        return client_common.summarize_metadata(
            json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True),
            json_format.MessageToDict(signature_defs, preserving_proto_field_name=True),
        )

    def status(self, version: int | None = None) -> list[dict]:
        """GetModelStatus: every version's state (or `version`'s), in the form of `client_common.summarize_status`."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._model_spec(version=version))
        response = self._call(self._model_stub.GetModelStatus, request)
        return client_common.summarize_status(json_format.MessageToDict(response, preserving_proto_field_name=True))

    def close(self) -> None:
        self._channel.close()


predict, metadata, status = client_common.one_request_functions(Client, "gRPC")


def main(argv: Sequence[str] | None = None) -> int:
    return client_common.main(argv, Client, "gRPC", "127.0.0.1:8500")


if __name__ == "__main__":
    sys.exit(main())
