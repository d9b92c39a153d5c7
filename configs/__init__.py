"""The shipped configs live in rd_keras/configs/ (`--config=fashion_mnist` names one); these paths keep working."""
