"""Dirac-parameterised convolution, W = a*I + b*V (DiracNets, Zagoruyko & Komodakis 2017).

A plain net has no shortcut to carry the identity; the Dirac parameterisation puts it inside the kernel
instead, which helps deep plain nets start training. I is the identity ("Dirac delta") kernel, a and b are
per-output-channel scales. At export `effective_kernel()` is copied into an ordinary Conv2D, so the deployed
graph stays a plain chain of convolutions.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def dirac_kernel(kernel_size, in_channels: int, out_channels: int) -> np.ndarray:
    """The identity kernel: centre tap 1 on channel pairs (c, c) for c < min(in, out), zero elsewhere."""
    kh, kw = kernel_size
    kernel = np.zeros((kh, kw, in_channels, out_channels), np.float32)
    for c in range(min(in_channels, out_channels)):
        kernel[kh // 2, kw // 2, c, c] = 1.0
    return kernel


@keras.saving.register_keras_serializable(package="rd_keras")
class DiracConv2D(keras.layers.Conv2D):
    """Conv2D whose kernel is `alpha * I + beta * V`; `self.kernel` holds V."""

    def __init__(self, *args, beta_init=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta_init = float(beta_init)

    def build(self, input_shape):
        super().build(input_shape)
        in_channels = input_shape[-1]
        self.alpha = self.add_weight(name="alpha", shape=(self.filters,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(self.filters,),
                                    initializer=keras.initializers.Constant(self.beta_init))
        self._identity = ops.convert_to_tensor(dirac_kernel(self.kernel_size, in_channels, self.filters))

    def effective_kernel(self):
        identity = ops.cast(self._identity, self.kernel.dtype)
        return self.alpha * identity + self.beta * self.kernel

    def convolution_op(self, inputs, kernel):
        # The base class passes V; convolve with the full a*I + b*V instead.
        del kernel
        return super().convolution_op(inputs, ops.cast(self.effective_kernel(), inputs.dtype))

    def get_config(self):
        return {**super().get_config(), "beta_init": self.beta_init}

    # Conv2D saves only kernel and bias; alpha and beta must travel with the .keras file too.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)
