"""rd_keras_serving/: the TF Serving-compatible dev server, both clients, the warm-up file and the REST codec.

A tiny conv net is exported exactly in the export contract (docs/design.md, "Export") and served over
loopback; every prediction is compared with the Keras model called directly.
"""

import gzip
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from rd_keras_serving import dev_server, grpc_client, json_codec, rest_client, warmup
from rd_keras_serving.client_common import ServingError
from rd_keras_serving.registry import RequestError

SHAPE = (8, 8, 1)
CLASSES = 5
MAX_BATCH = 16
HOST = "127.0.0.1"
# What both clients' status() return for the `served` fixture's single version.
AVAILABLE_V1 = [{"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]
IMAGES = np.random.default_rng(0).integers(0, 256, size=(MAX_BATCH, *SHAPE), dtype=np.uint8)


def export_plain(export_dir, seed):
    """Export a fresh model in the contract format; return its direct Keras (probabilities, classes)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x))

    def outputs(images):
        probabilities = tf.nn.softmax(model(images))
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        tf.function(lambda images: outputs(tf.cast(images, tf.float32) / 255.0),
                    input_signature=[tf.TensorSpec([None, *SHAPE], tf.uint8, name="images")]),
    )
    archive.add_endpoint(
        "predict_preprocessed",
        tf.function(outputs, input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32, name="images")]),
    )
    archive.write_out(str(export_dir), verbose=False)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(model(IMAGES.astype("float32") / 255.0)))
    return probabilities, probabilities.argmax(-1)


def assert_matches(outputs, expected, index=slice(None)):
    probabilities, classes = expected
    np.testing.assert_array_equal(outputs["classes"], classes[index])
    np.testing.assert_allclose(outputs["probabilities"], probabilities[index], atol=1e-5)


def rest(port, path, body=None):
    """(HTTP status, parsed JSON body) of a GET (body None) or POST with raw bytes."""
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "plain"
    expected = export_plain(base / "1", seed=1)
    warmup.write_warmup_requests(str(base / "1"), IMAGES[:4], "plain")
    server = dev_server.DevServer({"plain": str(base)}, grpc_port=0, rest_port=0,
                                  max_batch_size=MAX_BATCH, poll_seconds=0.2)
    with server:
        yield server, expected


def test_grpc_and_rest_predictions_match_keras(served):
    server, expected = served
    assert_matches(grpc_client.predict(IMAGES, HOST, server.grpc_port, "plain"), expected)
    assert_matches(rest_client.predict(IMAGES, HOST, server.rest_port, "plain"), expected)
    normalised = IMAGES.astype(np.float32) / 255.0
    assert_matches(grpc_client.predict(normalised, HOST, server.grpc_port, "plain", "predict_preprocessed"), expected)
    status, body = rest(server.rest_port, "/v1/models/plain/versions/1:predict",
                        json.dumps({"inputs": {"images": IMAGES[:3].tolist()}}).encode())
    assert status == 200
    assert_matches({k: np.asarray(v) for k, v in body["outputs"].items()}, expected, slice(0, 3))


def test_metadata_status_and_warmup(served):
    server, _ = served
    for meta in (grpc_client.metadata(HOST, server.grpc_port, "plain"),
                 rest_client.metadata(HOST, server.rest_port, "plain")):
        assert meta["version"] == 1
        assert set(meta["signatures"]) == {"serving_default", "predict_preprocessed"}
        default = meta["signatures"]["serving_default"]
        assert default["inputs"] == {"images": {"dtype": "DT_UINT8", "shape": [-1, *SHAPE]}}
        assert default["outputs"]["classes"]["dtype"] == "DT_INT64"
        assert meta["signatures"]["predict_preprocessed"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert rest(server.rest_port, "/v1/models/plain")[1]["model_version_status"][0]["state"] == "AVAILABLE"
    assert server.registry.get("plain").warmup_records == 2  # the single image and the whole batch


def test_malformed_grpc_requests_are_refused(served):
    server, expected = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"{HOST}:{server.grpc_port}"))

    def request(tensor, signature="serving_default", key="images"):
        r = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="plain", signature_name=signature))
        r.inputs[key].CopyFrom(tensor)
        return r

    truncated = tf.make_tensor_proto(IMAGES[:2])
    truncated.tensor_content = b"\x01\x02\x03"
    cases = {
        "shape": request(tf.make_tensor_proto(IMAGES[:, :4])),
        "dtype": request(tf.make_tensor_proto(IMAGES.astype(np.float32))),
        "oversize": request(tf.make_tensor_proto(np.zeros((MAX_BATCH + 1, *SHAPE), np.uint8))),
        "empty": request(tf.make_tensor_proto(np.zeros((0, *SHAPE), np.uint8))),
        "signature": request(tf.make_tensor_proto(IMAGES), signature="nope"),
        "missing key": request(tf.make_tensor_proto(IMAGES), key="pixels"),
        "not an image": request(tf.make_tensor_proto([b"\x89PNG garbage"])),
        "truncated": request(truncated),
    }
    for name, bad in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(bad, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    with pytest.raises(ServingError, match="INVALID_ARGUMENT.*batch size 17"):
        grpc_client.predict(np.zeros((17, *SHAPE), np.uint8), HOST, server.grpc_port, "plain")
    assert_matches(grpc_client.predict(IMAGES, HOST, server.grpc_port, "plain"), expected)


def test_malformed_rest_requests_are_refused(served):
    server, expected = served
    image = IMAGES[0].tolist()
    bodies = {
        "garbage bytes": b"\x00\xff\xfe not json",
        "not an object": b"[1, 2]",
        "no instances": json.dumps({"signature_name": "serving_default"}).encode(),
        "both formats": json.dumps({"instances": [image], "inputs": [image]}).encode(),
        "shape": json.dumps({"instances": [[[0] * 8] * 4]}).encode(),
        "ragged": json.dumps({"instances": [image, image[:3]]}).encode(),
        "float for uint8": json.dumps({"instances": [np.full(SHAPE, 0.5).tolist()]}).encode(),
        "out of range": json.dumps({"instances": [np.full(SHAPE, 300).tolist()]}).encode(),
        "strings": json.dumps({"instances": [np.full(SHAPE, "x").tolist()]}).encode(),
        "empty": json.dumps({"instances": []}).encode(),
        "oversize": json.dumps({"instances": [image] * (MAX_BATCH + 1)}).encode(),
        "signature": json.dumps({"signature_name": "nope", "instances": [image]}).encode(),
        "missing key": json.dumps({"instances": [{"pixels": image}]}).encode(),
    }
    for name, body in bodies.items():
        status, reply = rest(server.rest_port, "/v1/models/plain:predict", body)
        assert status == 400 and reply["error"], name
    assert_matches(rest_client.predict(IMAGES, HOST, server.rest_port, "plain"), expected)


def test_unknown_model_or_version_is_not_found(served):
    server, _ = served
    for model, version in (("nope", None), ("plain", 7)):
        with pytest.raises(ServingError) as error:
            grpc_client.predict(IMAGES, HOST, server.grpc_port, model, version=version)
        assert error.value.code == "NOT_FOUND"
        with pytest.raises(ServingError) as error:
            rest_client.predict(IMAGES, HOST, server.rest_port, model, version=version)
        assert error.value.code == "NOT_FOUND"
    assert rest(server.rest_port, "/v1/models/nope/metadata")[0] == 404
    assert rest(server.rest_port, "/v2/whatever")[0] == 404


def status_request(name, version=None, label=""):
    spec = model_pb2.ModelSpec(name=name, version_label=label)
    if version is not None:
        spec.version.value = version
    return get_model_status_pb2.GetModelStatusRequest(model_spec=spec)


def test_grpc_model_status_through_tf_serving_stub(served):
    server, _ = served
    expected = get_model_status_pb2.GetModelStatusResponse()
    expected.model_version_status.add(version=1, state="AVAILABLE", status=status_pb2.StatusProto(error_code="OK"))
    with grpc.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        for version in (None, 1):  # all versions, then the one asked for
            response = stub.GetModelStatus(status_request("plain", version), timeout=10)
            assert response == expected, version
            assert response.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE

        refused = [
            (status_request("nope"), grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope"),
            (status_request("nope", 1), grpc.StatusCode.NOT_FOUND, "Could not find version 1 of model nope"),
            (status_request("plain", 7), grpc.StatusCode.NOT_FOUND, "Could not find version 7 of model plain"),
            (get_model_status_pb2.GetModelStatusRequest(), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        ]
        for request, code, message in refused:
            with pytest.raises(grpc.RpcError) as error:
                stub.GetModelStatus(request, timeout=10)
            assert (error.value.code(), error.value.details()) == (code, message)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelStatus(status_request("plain", label="stable"), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels" in error.value.details()


def test_rest_model_status(served):
    server, _ = served
    available = {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]}
    assert rest(server.rest_port, "/v1/models/plain") == (200, available)
    assert rest(server.rest_port, "/v1/models/plain/versions/1") == (200, available)
    assert rest(server.rest_port, "/v1/models/nope") == (404, {"error": "Could not find any versions of model nope"})
    assert rest(server.rest_port, "/v1/models/plain/versions/7") == (
        404, {"error": "Could not find version 7 of model plain"})


def test_client_status_helpers_agree(served):
    server, _ = served
    for version in (None, 1):
        assert grpc_client.status(HOST, server.grpc_port, "plain", version) == AVAILABLE_V1
        with rest_client.Client(HOST, server.rest_port, "plain") as client:
            assert client.status(version) == AVAILABLE_V1
    for model, version, message in (("nope", None, "Could not find any versions of model nope"),
                                    ("plain", 7, "Could not find version 7 of model plain")):
        for client, port in ((grpc_client, server.grpc_port), (rest_client, server.rest_port)):
            with pytest.raises(ServingError) as error:
                client.status(HOST, port, model, version)
            assert (error.value.code, error.value.detail) == ("NOT_FOUND", message), client.__name__
    for client in (grpc_client, rest_client):
        with pytest.raises(ServingError) as error:
            client.status(HOST, free_port(), "plain", timeout=5)
        assert error.value.code == "UNAVAILABLE"


def test_client_status_command_lines(served, capsys):
    server, _ = served
    assert grpc_client.main([f"--server={HOST}:{server.grpc_port}", "--model_name=plain", "--status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == AVAILABLE_V1
    assert rest_client.main([f"--server={HOST}:{server.rest_port}", "--model_name=plain", "--status",
                             "--version=1"]) == 0
    assert capsys.readouterr().out == "plain\tversion 1\tAVAILABLE\n"
    assert rest_client.main([f"--server={HOST}:{server.rest_port}", "--model_name=nope", "--status"]) == 1
    assert "Could not find any versions of model nope" in capsys.readouterr().err


def test_clients_name_a_down_server():
    port = free_port()
    for client in (grpc_client, rest_client):
        with pytest.raises(ServingError, match=f"{HOST}:{port}.*unavailable") as error:
            client.predict(IMAGES, HOST, port, "plain", timeout=5)
        assert error.value.code == "UNAVAILABLE"


def test_new_versions_are_picked_up_and_partial_ones_never_served(tmp_path):
    base = tmp_path / "plain"
    expected_v1 = export_plain(base / "1", seed=1)
    with dev_server.DevServer({"plain": str(base)}, grpc_port=0, rest_port=0, poll_seconds=0.2) as server:
        assert_matches(grpc_client.predict(IMAGES, HOST, server.grpc_port, "plain"), expected_v1)
        expected_v2 = export_plain(base / ".tmp-2", seed=2)  # the exporter's write-then-rename
        os.rename(base / ".tmp-2", base / "2")
        deadline = time.monotonic() + 30
        while server.registry.get("plain").version != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not np.array_equal(expected_v1[0], expected_v2[0])
        available_v2, ended_v1 = AVAILABLE_V1[0] | {"version": 2}, AVAILABLE_V1[0] | {"state": "END"}
        assert grpc_client.status(HOST, server.grpc_port, "plain") == [available_v2, ended_v1]
        assert_matches(grpc_client.predict(IMAGES, HOST, server.grpc_port, "plain"), expected_v2)
        assert_matches(rest_client.predict(IMAGES, HOST, server.rest_port, "plain", version=2), expected_v2)

        (base / "3" / "variables").mkdir(parents=True)  # a copy in progress: no saved_model.pb yet
        shutil.copytree(base / "2", base / ".tmp-4")  # complete, but not renamed into place
        shutil.copytree(base / "2", base / "x5")
        shutil.copytree(base / "2", base / ".tmp-6")  # loads, but its warm-up requests have the wrong shape
        warmup.write_warmup_requests(str(base / ".tmp-6"), np.zeros((2, 4, 4, 1), np.uint8), "plain")
        os.rename(base / ".tmp-6", base / "6")
        (base / "7").mkdir()
        (base / "7" / "saved_model.pb").write_bytes(b"half-written")
        for _ in range(3):
            server.registry.poll()
        assert server.registry.get("plain").version == 2
        # Failed loads stay listed as END with their error, like TF Serving; ignored directories never appear.
        statuses = rest_client.status(HOST, server.rest_port, "plain")
        assert statuses == grpc_client.status(HOST, server.grpc_port, "plain")
        assert [(s["version"], s["state"], s["error_code"]) for s in statuses] == [
            (7, "END", "UNKNOWN"), (6, "END", "INVALID_ARGUMENT"), (2, "AVAILABLE", "OK"), (1, "END", "OK")]
        assert "saved_model.pb" in statuses[0]["error_message"] and "shape" in statuses[1]["error_message"]
        for version in (3, 4, 6, 7):
            with pytest.raises(ServingError, match="NOT_FOUND"):
                grpc_client.predict(IMAGES, HOST, server.grpc_port, "plain", version=version)
        assert_matches(grpc_client.predict(IMAGES, HOST, server.grpc_port, "plain"), expected_v2)


def test_concurrent_clients_all_answered_correctly(served):
    server, expected = served
    threads, per_thread = 8, 250
    failures, answered = [], []

    def worker(index):
        module, port = (grpc_client, server.grpc_port) if index % 2 else (rest_client, server.rest_port)
        rng = np.random.default_rng(index)
        with module.Client(HOST, port, "plain") as client:
            for _ in range(per_thread):
                start = int(rng.integers(0, MAX_BATCH - 4))
                batch = slice(start, start + int(rng.integers(1, 5)))
                try:
                    assert_matches(client.predict(IMAGES[batch]), expected, batch)
                    answered.append(1)
                except Exception as error:  # collected: a failure in a thread must fail the test
                    failures.append(repr(error))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert failures == []
    assert len(answered) == threads * per_thread


def test_client_command_lines(served, tmp_path, capsys):
    server, (_, classes) = served
    idx = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(idx, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (MAX_BATCH, 8, 8)) + IMAGES.tobytes())
    argv = ["--model_name=plain", f"--idx={idx}", "--limit=5", "--batch_size=2", "--json"]
    assert grpc_client.main([f"--server={HOST}:{server.grpc_port}", *argv]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in rows] == classes[:5].tolist()

    images_dir = tmp_path / "pngs"
    images_dir.mkdir()
    for i in range(3):
        Image.fromarray(IMAGES[i, ..., 0]).save(images_dir / f"{i}.png")
    assert rest_client.main([f"--server={HOST}:{server.rest_port}", f"--images_dir={images_dir}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[f"{i}.png", str(classes[i])] for i in range(3)]

    assert rest_client.main([f"--server={HOST}:{free_port()}", f"--images_dir={images_dir}"]) == 1
    assert "unavailable" in capsys.readouterr().err


def test_dev_server_command_line_and_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        dev_server.main(["--help"])
    assert exit_.value.code == 0 and "--model_config_file" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dev_server.parse_args(["--port=8500"])  # neither a base path nor a config file
    config = os.path.join(os.path.dirname(dev_server.__file__), "models.config")  # shipped in the wheel
    assert dev_server.read_model_config(config) == {"plain": "/models/plain"}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_rest_json_round_trips_tensors(data):
    dtype = data.draw(st.sampled_from([np.uint8, np.int64, np.float32]))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    elements = st.floats(width=32, allow_nan=False, allow_infinity=False) if dtype == np.float32 else None
    array = data.draw(hnp.arrays(dtype, shape, elements=elements))
    spec = tf.TensorSpec([None, *shape[1:]], dtype)
    row = data.draw(st.booleans())
    body = {"instances": array.tolist()} if row else {"inputs": {"x": array.tolist()}}
    _, fmt, payload = json_codec.parse_predict_body(json.dumps(body).encode())
    decoded = json_codec.decode_inputs(fmt, payload, {"x": spec})["x"]
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)

    reply = json.loads(json.dumps(json_codec.encode_predict_response(fmt, {"a": array, "b": array})))
    if row:
        np.testing.assert_array_equal(np.asarray([r["a"] for r in reply["predictions"]], dtype), array)
    else:
        np.testing.assert_array_equal(np.asarray(reply["outputs"]["b"], dtype), array)

    if dtype == np.uint8:  # any value outside uint8 is refused, never wrapped
        values = array.ravel().tolist()
        values[data.draw(st.integers(0, len(values) - 1))] = data.draw(
            st.one_of(st.integers(max_value=-1), st.integers(min_value=256))
        )
        bad = np.array(values, dtype=object).reshape(shape).tolist()
        with pytest.raises(RequestError, match="cannot be converted to uint8"):
            json_codec.decode_inputs("instances", json.loads(json.dumps(bad)), {"x": spec})
