"""Importing TensorFlow without its C++ start-up lines: what every face (scripts, Ray workers) needs
before TensorFlow loads. A low-level module: it imports nothing of the package."""
import os
import sys


def quiet_tensorflow():
    """Silence TensorFlow's C++ log lines (must run before TensorFlow is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow_quietly():
    """Import TensorFlow and Keras with stderr muted at the file-descriptor level.

    TensorFlow's C++ layer prints start-up lines (oneDNN, CUDA probing) before its log level is
    read; a researcher should see our messages, not those. Import errors still surface: the
    exception is raised after stderr is restored.
    """
    quiet_tensorflow()
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        try:
            import keras  # noqa: F401
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing logs happen here
        finally:
            os.dup2(saved, 2)
    finally:
        os.close(saved)
