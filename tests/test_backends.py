"""The backends' lifetimes: the local backend closes any number of times; a Ray backend closes only the
runtime it owns; a Ray runtime (RayRuntime, a context manager) shuts down the cluster it started and leaves
one it joined (running in this process, or at an address)."""
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from influence.backends import LocalBackend
from influence.backends.ray_driver import RayBackend
from influence.backends.ray_runtime import RayRuntime, init_ray
from influence.backends.ray_worker import WorkerSpec

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def test_the_local_backend_closes_twice_and_as_a_context_manager():
    backend = LocalBackend()
    with backend as entered:
        assert entered is backend
    backend.close()
    backend.close()
    with backend:                   # and used again after closing (it holds nothing)
        pass


class _Runtime:
    """A stand-in for RayRuntime that counts its closes."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


def _spec():
    return WorkerSpec(model="m.keras", weights="none", preprocess="unit", params="all", hessian="ggn",
                      solver="ekfac", damping=0.1, options=(), train="/x/train.npz", train_fingerprint="0",
                      weights_fingerprint="0", parts="/x/parts")


def test_a_ray_backend_closes_only_the_runtime_it_owns():
    lent = _Runtime()
    with RayBackend(_spec(), runtime=lent) as backend:
        assert backend.runtime is lent
    backend.close()
    assert lent.closed == 0                                 # its owner's to close
    own = RayBackend(_spec(), workers=1)
    assert isinstance(own.runtime, RayRuntime)
    closes = []
    own.runtime.close = lambda real=own.runtime.close: (closes.append(1), real())
    with own:
        pass
    own.close()                                             # never connected: nothing to shut, twice
    assert len(closes) == 2


def _answers(address):
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_ray_runtime_shuts_down_the_cluster_it_started_and_leaves_one_it_joined():
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-distributed.txt")
    assert not ray.is_initialized()
    # started: shut down on leaving the with block (its GCS stops answering); closing again does nothing
    runtime = RayRuntime(workers=1)
    with runtime:
        assert runtime.cluster().started and ray.is_initialized()
        address = ray.get_runtime_context().gcs_address
        assert _answers(address)
    assert not ray.is_initialized()
    runtime.close()
    deadline = time.monotonic() + 60
    while _answers(address) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _answers(address), f"the cluster it started still answers at {address}"
    # joined: a runtime already running in this process is left running, and so is a cluster that another
    # driver (a process of its own) joined at its address with RayRuntime(address=...)
    init_ray(workers=1, gpus=0)
    try:
        with RayRuntime(workers=1) as runtime:
            assert not runtime.cluster().started
        assert ray.is_initialized()
        address = ray.get_runtime_context().gcs_address
        joined = ("import sys, ray\nfrom influence.backends.ray_runtime import RayRuntime\n"
                  "with RayRuntime(address=sys.argv[1]) as runtime:\n    assert runtime.cluster().started\n"
                  "assert not ray.is_initialized()\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", joined, address], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ray.is_initialized() and _answers(address)
        assert ray.get(ray.remote(num_cpus=1)(lambda: 7).remote(), timeout=120) == 7
    finally:
        ray.shutdown()
