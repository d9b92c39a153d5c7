"""REST client for TF Serving's `:predict`, metadata and model status API (tensorflow_model_server or
rd_keras_serving.dev_server); urllib only.

    from rd_keras_serving import rest_client
    outputs = rest_client.predict(images_uint8, "127.0.0.1", 8501, "plain")
    rest_client.status("127.0.0.1", 8501, "plain")  # [{"version": 1, "state": "AVAILABLE", ...}]

    python -m rd_keras_serving.rest_client --server=127.0.0.1:8501 --model_name=plain --images_dir=some/pngs [--json]
    python -m rd_keras_serving.rest_client --server=127.0.0.1:8501 --model_name=plain --status [--version=N] [--json]

Requests use the row format ({"instances": [...]}); outputs come back as numpy arrays with the dtypes JSON
can carry (float64 for float outputs, int64 for integer ones). Failures raise `ServingError` naming
host:port, with the server's {"error": ...} message when it refused the request.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from rd_keras_serving import client_common
from rd_keras_serving.client_common import ServingError

_HTTP_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 500: "INTERNAL", 503: "UNAVAILABLE"}


class Client(client_common.ClientBase):
    """Requests to one server and model. A context manager, like the gRPC client (urllib opens one
    connection per request, so `close` has nothing to release)."""

    def _url(self, version: int | None, suffix: str) -> str:
        path = f"/v1/models/{urllib.request.quote(self.model_name, safe='')}"
        if version is not None:
            path += f"/versions/{int(version)}"
        return f"http://{self.target}{path}{suffix}"

    def _request(self, url: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                detail = raw.decode("utf-8", "replace")[:500] or error.reason
            raise ServingError(self.target, _HTTP_CODES.get(error.code, f"HTTP {error.code}"), detail) from None
        except (urllib.error.URLError, OSError) as error:  # refused connection, timeout, reset
            raise ServingError(self.target, "UNAVAILABLE", str(getattr(error, "reason", error))) from None

    def predict(
        self,
        images: np.ndarray,
        signature_name: str = "serving_default",
        version: int | None = None,
        input_key: str = "images",
    ) -> dict[str, np.ndarray]:
        """Outputs of `signature_name` for `images`; a single-output signature returns {"predictions": ...}."""
        images = np.asarray(images)
        instances = [{input_key: image} for image in images.tolist()]
        body = {"signature_name": signature_name, "instances": instances}
        reply = self._request(self._url(version, ":predict"), body)
        predictions = reply["predictions"]
        if predictions and isinstance(predictions[0], dict):
            return {key: np.asarray([row[key] for row in predictions]) for key in predictions[0]}
        return {"predictions": np.asarray(predictions)}

    def metadata(self, version: int | None = None) -> dict:
        """Signatures of the served model, in the form of `client_common.summarize_metadata`."""
        reply = self._request(self._url(version, "/metadata"))
        return client_common.summarize_metadata(reply["model_spec"], reply["metadata"]["signature_def"])

    def status(self, version: int | None = None) -> list[dict]:
        """`GET /v1/models/<name>[/versions/<v>]`, in the form of `client_common.summarize_status`."""
        return client_common.summarize_status(self._request(self._url(version, "")))


predict, metadata, status = client_common.one_request_functions(Client, "REST")


def main(argv: Sequence[str] | None = None) -> int:
    return client_common.main(argv, Client, "REST", "127.0.0.1:8501")


if __name__ == "__main__":
    sys.exit(main())
