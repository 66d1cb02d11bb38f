"""``--backend ray``: the same jobs as Ray tasks, one GPU each when the cluster has GPUs.

The caller passes the remote function, ``task(target, job_id, device, cpus, stale_after) -> result dict``
(a zoo passes :func:`testbed.zoo.entries.ray_entry_task`, `testbed bench` its pair task).

Why Ray only schedules: a zoo's task runs :func:`testbed.zoo.entries.build_entry`, which takes the same claim,
resumes from the same checkpoint and writes the same ``done.json`` and manifest as a local worker, so local
and Ray builders can even work on one zoo together.  The zoo directory must therefore be on a filesystem
every Ray node sees at the same path (NFS, Lustre, a shared volume), and the nodes must have segbackdoor
installed (``pip install segbackdoor[ray]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.core.errors import UserError


class RayExecutor:
    """Submits entries as Ray tasks; ``ray.init(address)`` joins a cluster, no address starts a local one."""

    def __init__(self, zoo: Path, address: str | None, device: str, stale_after: float, cpus_per_task: int = 1,
                 init_kwargs: dict[str, Any] | None = None, task: Any = None):
        if task is None:
            raise TypeError("RayExecutor needs task(target, job_id, device, cpus, stale_after)")
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray; install it with `pip install segbackdoor[ray]`") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": True, **(init_kwargs or {})}
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"at {address}" if address else "locally"
                raise UserError(f"could not start or reach a Ray cluster {where} ({e}); start one with "
                                "`ray start --head` and pass --ray-address HOST:6379") from None
            self._started = True
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 and device != "cpu"
        self.slots = max(1, int(gpus if use_gpu else ray.cluster_resources().get("CPU", 1) // cpus_per_task))
        self.task = ray.remote(task).options(num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_task, max_retries=0)
        self.args = (str(Path(zoo).resolve()), device, cpus_per_task, stale_after)

    def start(self, entry_id: str):
        zoo, device, cpus, stale_after = self.args
        return self.task.remote(zoo, entry_id, device, cpus, stale_after)

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        out = []
        for h in ready:
            try:
                out.append((h, self.ray.get(h)))
            except Exception as e:  # noqa: BLE001 - a task or node died; the claim goes stale, a rerun resumes
                out.append((h, {"status": "failed", "error": f"Ray task failed: {type(e).__name__}: {e}"}))
        return out

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
