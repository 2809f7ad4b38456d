"""Where independent units of work (one model's scan, one bench cell) run: in this process, or as
Ray tasks on a local Ray instance or an existing cluster. Adding an engine is one ``Executor``
subclass and one line in ``EXECUTORS``.

Every engine runs the same ``run_task`` wrapper, so a unit computes the same numbers wherever it
runs (same torch thread count; the unit seeds itself) and fails the same way: an exception inside a
unit becomes a ``TaskOutcome`` with a one-line error, and the other units go on.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bdaudit.core.errors import BdauditError

EXECUTOR_NAMES = ("local", "ray")
RAY_MISSING = "`executor` ray needs Ray, which is not installed: pip install 'bdaudit[ray]'"


@dataclass
class TaskOutcome:
    """One unit's result (``value``) or its error; ``exit_code`` 2 for bad input (a model that does
    not load, data that does not fit), 3 for anything else."""

    index: int
    value: Any = None
    error: str | None = None
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def run_task(fn: Callable[..., Any], threads: int, args: tuple[Any, ...]) -> tuple[Any, str | None, int]:
    """Run one unit with the driver's torch thread count: (value, error, exit code).

    Errors are returned, not raised, so they cross process boundaries as plain data;
    KeyboardInterrupt is not an Exception and still stops the run."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # reductions split by thread count: same count, same bits
    try:
        return fn(*args), None, 0
    except BdauditError as exc:
        return None, str(exc), 2
    except Exception as exc:  # noqa: BLE001 - one unit's bug must not stop the others
        return None, f"internal error: {type(exc).__name__}: {exc}", 3


class Executor:
    """Runs ``fn(*args)`` for each args tuple and yields outcomes as units finish (any order)."""

    name = "base"

    def share(self, value: Any) -> Any:
        """A handle for a large value several units take as a top-level argument (sent once)."""
        return value

    def gpus_per_task(self, device: str) -> int:
        return 0

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, device: str = "cpu",
            ) -> Iterator[TaskOutcome]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name}

    def close(self) -> None:
        """Release what this executor started (never a cluster it only joined)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """In this process, one unit after another, in order: what bdaudit always did."""

    name = "local"

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, device: str = "cpu",
            ) -> Iterator[TaskOutcome]:
        import torch

        threads = torch.get_num_threads()
        for index, args in enumerate(calls):
            value, error, code = run_task(fn, threads, args)
            yield TaskOutcome(index, value, error, code)


def _ray_module() -> Any:
    """Ray is the optional extra ``bdaudit[ray]``: imported only here, only for --executor ray (by
    name, so that import checkers that know only runtime dependencies do not count it as one)."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise BdauditError(RAY_MISSING) from None


class RayExecutor(Executor):
    """One Ray task per unit, each declaring the driver's torch thread count in CPUs and, when the
    device is CUDA, one GPU (so a multi-GPU machine runs one unit per GPU). Joins ``address``
    (``auto``: the cluster this machine belongs to) or an already initialised Ray, else starts a
    local instance and stops it on close.
    Workers must be able to import bdaudit (install it on every node of a cluster)."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.ray = _ray_module()
        self.started = False
        if address:
            _check_reachable(address)
        if not self.ray.is_initialized():
            options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
            address = address or os.environ.get("RAY_ADDRESS")  # as ray.init itself would
            if address:
                options["address"] = address
            else:
                options["include_dashboard"] = False
            try:
                self.ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise BdauditError(f"cannot start or reach {where}: {exc}; check `ray_address` "
                                   "(host:port of the head node, or auto)") from None
            self.started = not address
        self._remote = self.ray.remote(_ray_entry)

    def share(self, value: Any) -> Any:
        return self.ray.put(value)

    def gpus_per_task(self, device: str) -> int:
        if device.startswith("cuda"):
            return 1
        if device == "auto":  # the workers, not this driver, decide: auto uses a GPU if the cluster has one
            return int(self.ray.cluster_resources().get("GPU", 0) > 0)
        return 0

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, device: str = "cpu",
            ) -> Iterator[TaskOutcome]:
        import torch

        ray = self.ray
        # A task computes with the driver's thread count (the same bits as --executor local) and
        # reserves that many CPUs, so tasks never oversubscribe a node: OMP_NUM_THREADS=1 gives one
        # task per core. Capped at the largest node, or the task could never be scheduled.
        threads = min(torch.get_num_threads(), self._largest_node_cpus())
        remote = self._remote.options(num_cpus=threads, num_gpus=self.gpus_per_task(device), max_retries=0)
        # args spread as top-level task arguments: Ray resolves shared handles (ObjectRefs) only there.
        pending = {remote.remote(fn, threads, *args): index for index, args in enumerate(calls)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    try:
                        value, error, code = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died (OOM, crash) or was cancelled
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        value, error, code = None, f"internal error: Ray task failed: {first}", 3
                    yield TaskOutcome(index, value, error, code)
        finally:
            for ref in pending:  # interrupted: do not leave the cluster computing unwanted cells
                ray.cancel(ref, force=True)

    def _largest_node_cpus(self) -> int:
        cpus = [node.get("Resources", {}).get("CPU", 0) for node in self.ray.nodes() if node.get("Alive")]
        return max(1, int(max(cpus, default=1)))

    def info(self) -> dict[str, Any]:
        resources = self.ray.cluster_resources()
        return {"name": self.name, "cpus": resources.get("CPU"), "gpus": resources.get("GPU", 0)}

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (ray.init retries for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return  # "auto" and other forms: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise BdauditError(f"cannot reach the Ray cluster at {address}: {exc}; check `ray_address` "
                           "(HOST:PORT of the head node, e.g. 10.0.0.5:6379) or start one with `ray start --head`"
                           ) from None


def _ray_entry(fn: Callable[..., Any], threads: int, *args: Any) -> tuple[Any, str | None, int]:
    return run_task(fn, threads, args)


EXECUTORS: dict[str, Callable[[str | None], Executor]] = {
    "local": lambda address: LocalExecutor(),
    "ray": lambda address: RayExecutor(address),
}


def create_executor(name: str = "local", address: str | None = None) -> Executor:
    """``local`` (default) or ``ray``; ``address`` is for engines that join a cluster."""
    if name not in EXECUTORS:
        raise BdauditError(f"`executor` must be one of {', '.join(EXECUTORS)}, not '{name}'")
    if address and name == "local":
        raise BdauditError("`ray_address` needs `executor` ray")
    return EXECUTORS[name](address or None)
