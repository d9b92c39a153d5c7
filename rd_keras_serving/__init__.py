"""Serving the exported plain CNN: TF Serving-compatible dev server, gRPC and REST clients, warm-up file.

Modules (nothing in `rd_keras` imports this package):
  dev_server     gRPC PredictionService and ModelService + REST API over a TF Serving model base path
                 (development and tests)
  registry       version discovery, loading, hot swap, version status and request validation (dev server)
  json_codec     TF Serving REST JSON <-> numpy
  grpc_client    `predict` / `metadata` / `status` / CLI over gRPC (tensorflow-serving-api stubs)
  rest_client    the same over REST (urllib)
  client_common  ServingError, metadata and status summaries, one-request functions and the command line
                 shared by both clients
  inputs         image folder / IDX file -> uint8 batches at the model's input size
  warmup         `write_warmup_requests` for assets.extra/tf_serving_warmup_requests
Production serving uses tensorflow_model_server; see rd_keras_serving/README.md.
"""
