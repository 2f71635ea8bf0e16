"""EchoCare FL core: encoder, pretraining, data, checkpoints. Never imports flwr."""

__version__ = "0.1.0"
