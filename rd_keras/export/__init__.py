"""Deployment: ship the plain net of a training workdir (`python -m rd_keras.export --workdir=W`).

- `workdir_export`: `export_workdir(...)` and the command line: fold, export, check, `report.json`.
- `folding`: BatchNorm and Dirac folded into plain convs.
- `saved_model_export`: versioned SavedModels in TF Serving's layout, with warm-up requests.
- `tflite_export`: `.tflite` files (none, fp16, dynamic, int8) and `TFLiteRunner`; `pixels`: how each file
  takes uint8 pixels with the normalisation inside; `metadata`: labels and input description in the file;
  `quantize`: the int8 input quantiser of bare files (numpy only).
- `qat`: quantisation-aware training, run as its own process (`python -m rd_keras.export.qat`); the only
  module that imports tensorflow_model_optimization.

The training core imports this package in one place only: `train_lib` when `config.export.enabled`.
The names below are loaded on first use, so importing a light module of this package (`quantize`) does
not import TensorFlow.
"""

_LAZY = ("FORMATS", "dataset_info", "export_workdir", "format_table", "load_workdir", "main", "parse_options")
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from rd_keras.export import workdir_export

        return getattr(workdir_export, name)
    raise AttributeError(f"module 'rd_keras.export' has no attribute {name!r}")
