"""rd_keras: Residual Distillation for TensorFlow/Keras.

Train a ResNet and its plain twin (every shortcut removed) jointly, then deploy the plain net alone.

From Keras code: `rd_keras.ResidualDistiller(teacher, student)` with `compile()`/`fit()`,
`rd_keras.make_plain(resnet)` for the plain twin, `rd_keras.BlendSchedule` for m(t).
"""

__version__ = "0.1.0"

# Loaded on first use, so that `import rd_keras` does not import TensorFlow.
_LAZY = {"ResidualDistiller": "rd_keras.distiller", "make_plain": "rd_keras.twins",
         "BlendSchedule": "rd_keras.schedules", "WarmupCosine": "rd_keras.schedules"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rd_keras' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
