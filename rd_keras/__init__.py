"""rd_keras: Residual Distillation for TensorFlow/Keras.

Train a ResNet and its plain twin (every shortcut removed) jointly, then deploy the plain net alone.
"""

__version__ = "0.1.0"
