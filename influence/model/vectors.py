"""Vectors over the selected parameters ("a Vec": a tuple of tensors shaped like ``classifier.variables``)
and the arithmetic every solver does on them."""
import numpy as np
import tensorflow as tf


# ----------------------------------------------------------------------------- Vec helpers

def vec_dot(a, b):
    """Σ a·b over all parts, as a float64 Python number."""
    return float(sum(tf.reduce_sum(tf.cast(x, tf.float64) * tf.cast(y, tf.float64)) for x, y in zip(a, b)))


def vec_norm(a):
    return float(np.sqrt(max(vec_dot(a, a), 0.0)))


def vec_axpy(alpha, x, y):
    """alpha·x + y."""
    return tuple(alpha * xi + yi for xi, yi in zip(x, y))


def vec_scale(alpha, x):
    return tuple(alpha * xi for xi in x)


def vec_size(like):
    """Number of scalars in a Vec (or a list of variables): P."""
    return int(sum(int(np.prod(t.shape)) for t in like))


def vec_to_numpy(v):
    """Vec -> float64 array (P,)."""
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in v])


def split_flat(flat, like):
    """float array (P,) -> numpy arrays (views) shaped like ``like`` (a list of variables or tensors), in order."""
    out, at = [], 0
    for ref in like:
        shape = tuple(ref.shape)
        size = int(np.prod(shape))
        out.append(np.asarray(flat[at:at + size]).reshape(shape))
        at += size
    return out


def numpy_to_vec(flat, like):
    """float array (P,) -> Vec shaped and typed like ``like`` (a list of variables or tensors)."""
    return tuple(tf.constant(part, dtype=ref.dtype) for part, ref in zip(split_flat(flat, like), like))


def vec_stack(vecs):
    """list of T Vecs -> Vec whose parts have a leading axis T."""
    return tuple(tf.stack(parts) for parts in zip(*vecs))
