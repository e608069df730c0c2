"""The Ray runtime one backend uses: started locally with a number of worker slots, or joined at an
address, owned by a :class:`RayRuntime` (a context manager: the runtime it started is shut down on
:meth:`RayRuntime.close`), and what the driver submits through (:class:`Cluster`: task options, slots,
:meth:`Cluster.remote`, :meth:`Cluster.run`).

Ray is optional: it is imported only inside the functions that need it.
"""
import dataclasses
import importlib.util
import logging
import os
import time
from pathlib import Path

from influence.errors import SettingError, UserError

log = logging.getLogger(__name__)

#: a task whose worker dies is run again this many times
MAX_RETRIES = 3
INSTALL = "pip install -r requirements-distributed.txt"


def enabled(settings):
    """True when ``workers`` or ``ray_address`` asks for Ray."""
    return bool(getattr(settings, "workers", 0) or getattr(settings, "ray_address", None))


def _setting(settings):
    """The setting that asks for Ray: ``ray_address`` or ``workers``."""
    return "ray_address" if getattr(settings, "ray_address", None) else "workers"


def check(settings):
    """One-line errors for the scale-out settings, before any work (Ray is looked up, not imported;
    the bound of ``workers`` is the setting's own check, :meth:`influence.settings.Settings.check`)."""
    if importlib.util.find_spec("ray") is None:
        raise SettingError(_setting(settings), f"needs Ray: {INSTALL}")
    if settings.ray_address:
        _check_reachable(settings.ray_address)


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise SettingError("workers", f"needs Ray: {INSTALL}") from None
    return ray


def _worker_env():
    """Environment of the worker processes: this package importable, TensorFlow quiet."""
    root = str(Path(__file__).resolve().parents[2])
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(path), "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_USAGE_STATS_ENABLED": "0",
            "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def _local_gpus():
    try:
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    except ImportError:
        return 0


def init_ray(workers=0, address=None, gpus=None):
    """Start a local Ray runtime with ``workers`` worker slots (one GPU each when there are GPUs),
    or join the cluster at ``address``. Returns the ``ray`` module. Usage statistics are off."""
    ray = _import_ray()
    common = dict(runtime_env={"env_vars": _worker_env()}, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SettingError("ray_address", f"{address}: cannot join the Ray cluster ({str(exc).splitlines()[0]}); "
                            f"start it with `ray start --head` (see README)") from None
        return ray
    gpus = _local_gpus() if gpus is None else gpus
    ray.init(num_cpus=int(workers), num_gpus=min(int(gpus), int(workers)), include_dashboard=False, **common)
    return ray


def _check_reachable(address, timeout=10.0):
    """A one-line error when ``host:port`` does not answer (Ray itself would retry for minutes)."""
    import socket

    host, sep, port = str(address).rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return                                   # "auto", ray:// and other forms: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SettingError("ray_address", f"{address}: nothing answers there ({exc.strerror or exc}); start the "
                        f"cluster with `ray start --head --port {port}` on {host} (see README)") from None


@dataclasses.dataclass
class Cluster:
    """What the driver knows of the runtime: task options and how many tasks run at once."""

    ray: object
    options: dict
    slots: int
    started: bool
    seconds: float

    def remote(self, fn):
        """``fn`` as a Ray task with this cluster's options (one CPU or one GPU), retried when its worker dies."""
        return self.ray.remote(max_retries=MAX_RETRIES, **self.options)(fn)

    def run(self, task, jobs, on_result, window=None, held=lambda: 0):
        """Submit ``task.remote(*args)`` for each ``(index, args)`` in ``jobs``, at most ``window`` in
        flight (default: twice the slots; ``held()`` counts finished results the caller still holds),
        and call ``on_result(index, value)`` as they finish. Task failures become one-line errors."""
        ray = self.ray
        window = window or 2 * self.slots
        jobs = list(jobs)
        pending, at = {}, 0
        while at < len(jobs) or pending:
            while at < len(jobs) and len(pending) + held() < window:
                index, args = jobs[at]
                pending[task.remote(*args)] = index
                at += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, UserError):
                        raise UserError(f"on a worker: {cause}") from None
                    raise
                except ray.exceptions.RayError as exc:
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                    raise UserError(f"a shard failed {MAX_RETRIES + 1} times ({type(exc).__name__}: {first}); "
                                    f"finished shards are kept: rerun to resume") from None
                del ref
                on_result(index, value)


def connect(workers=0, address=None):
    """The Ray runtime: the one running in this process, else started with ``workers`` slots (or joined at
    ``address``) -> :class:`Cluster` (``started``: whether this call started or joined it)."""
    t0 = time.perf_counter()
    ray = _import_ray()
    started = False
    if ray.is_initialized():
        how = "using the running Ray runtime"
    elif address:
        init_ray(address=address)
        started, how = True, f"joined the Ray cluster at {address}"
    elif not workers:
        raise SettingError("workers", "must be at least 1 to start a local Ray runtime (or give ray_address)")
    else:
        init_ray(workers)
        started, how = True, "started a local Ray runtime"
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        options, slots = {"num_gpus": 1, "num_cpus": 0}, gpus
    else:
        options, slots = {"num_cpus": 1}, max(1, cpus)
    if workers:
        if gpus and workers > gpus:
            log.warning("workers %d but %d GPU(s): one task per GPU, %d at once", workers, gpus, gpus)
        slots = min(slots, workers)
    seconds = time.perf_counter() - t0
    log.info("ray: %s in %.1f s; %d task(s) at once, one %s each (%d CPU, %d GPU in all)", how, seconds, slots,
             "GPU" if gpus else "CPU", cpus, gpus)
    return Cluster(ray, options, slots, started, seconds)


class RayRuntime:
    """The Ray runtime of one backend (or of one calculate job, lent to its backends and its calibration):
    connected on first use (:meth:`cluster`), shut down by :meth:`close` if it started or joined it.
    A context manager."""

    def __init__(self, workers=0, address=None):
        self.workers, self.address = int(workers or 0), address or None
        self._cluster = None

    def cluster(self):
        """The :class:`Cluster`, connected now if not yet (:func:`connect`)."""
        if self._cluster is None:
            self._cluster = connect(self.workers, self.address)
        return self._cluster

    def close(self):
        """Shut the runtime down if this object started (or joined) it; a later :meth:`cluster` connects again."""
        cluster, self._cluster = self._cluster, None
        if cluster is not None and cluster.started:
            cluster.ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
