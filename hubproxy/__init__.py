"""hubproxy: a streaming, verified, single-flight caching proxy for TensorFlow Hub model archives."""

__version__ = "0.1.0"
