"""Joining or starting the Ray cluster a job runs on: one bootstrap for preprocessing, pretraining
and fine-tuning.

- Under ``ray job submit`` (``RAY_ADDRESS`` set) or with an explicit address, the job joins that
  cluster. Otherwise it starts a local instance sized for the work (``num_cpus``: logical CPUs;
  preprocessing's Ray Data tasks need CPUs beside its driver or its reads starve).
- ``RAY_AUTH_MODE`` defaults to ``disabled``: a plain ``ray.init()`` writes a token file that later
  makes ``ray start`` / ``ray job submit`` fail with authentication errors.
- Workers get ``DS_ACCELERATOR`` (DeepSpeed's accelerator: cpu or cuda) and the auth mode.
- Ray's own INFO chatter and Ray Data's progress bars are turned off in the driver and, through
  a worker setup hook (:func:`quiet_logs`), in every worker and actor; our progress bars and
  summaries stay. Environment settings for tests and small machines: ``CFDIST_RAY_NUM_CPUS`` (the
  logical CPUs of a local instance when the job does not size it itself; training jobs do, from
  their worker count), ``CFDIST_RAY_NODE_IP`` (e.g. 127.0.0.2 to stay on
  loopback), ``CFDIST_RAY_OBJECT_STORE`` (bytes).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cfdist import storage


def runtime_env(use_gpu: bool = False) -> dict[str, Any]:
    """The runtime environment every Ray worker of a cfdist job gets."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # object-storage credentials and endpoints: Ray does not forward AWS_* / GCS variables itself
    return {"env_vars": {**storage.worker_env(), "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
                         "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]},
            "worker_process_setup_hook": "cfdist.cluster.quiet_logs"}


def init_ray(*, address: str | None = None, num_cpus: int | None = None, use_gpu: bool = False,
             object_store_memory: int = 1 << 30, include_dashboard: bool = False) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local instance; reuse one already started."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"runtime_env": runtime_env(use_gpu), "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            if num_cpus is None and os.environ.get("CFDIST_RAY_NUM_CPUS"):
                num_cpus = int(os.environ["CFDIST_RAY_NUM_CPUS"])
            if os.environ.get("CFDIST_RAY_NODE_IP"):
                kwargs["_node_ip_address"] = os.environ["CFDIST_RAY_NODE_IP"]
            memory = int(os.environ.get("CFDIST_RAY_OBJECT_STORE", object_store_memory))
            ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, object_store_memory=memory, **kwargs)
    quiet_ray_data()


def train_logging_config():
    """Ray Train's own log level (its controller and workers configure logging from the RunConfig)."""
    import ray

    return ray.LoggingConfig(log_level="WARNING")


def quiet_ray_data() -> None:
    """No Ray Data progress bars or Ray INFO lines in this process."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_logs()


def quiet_logs() -> None:
    """Ray Data / Train / Tune log warnings and errors only; known harmless deprecation notices of
    our dependencies are dropped. The worker setup hook of every cfdist job."""
    import warnings

    import ray.data  # noqa: F401  (it configures its loggers on import; set the levels after that)

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled" is announced with a warning on every run
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO calls a torch.distributed function torch has deprecated (not ours to change)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
