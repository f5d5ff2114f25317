"""`prefix-serve serve --replicas N [--ray-address ADDR]`: start (or join) a Ray cluster, deploy the application,
serve until SIGINT/SIGTERM, then take it down (and the local cluster with it, when this command started one)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from service.settings import Settings

logger = logging.getLogger(__name__)


def ray_missing_message() -> str:
    return 'scale-out needs Ray Serve: pip install "prefix-serve[ray]"'


def start_ray(settings: Settings) -> bool:
    """Connect to `settings.ray_address`, or start a private local cluster. True when this process started it."""
    import ray

    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **quiet)
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, **quiet}
    if settings.ray_num_cpus is not None:
        kwargs["num_cpus"] = settings.ray_num_cpus
    if settings.ray_temp_dir is not None:
        kwargs["_temp_dir"] = str(settings.ray_temp_dir.expanduser().resolve())
    ray.init(**kwargs)
    return True


def resource_problem(settings: Settings, resources: dict[str, float], gpus_per_replica: float) -> str | None:
    """Why the replicas cannot all be placed on a cluster with these resources (Serve would wait forever), or None."""
    replicas = max(1, settings.replicas)
    for name, each in (("CPU", settings.ray_cpus_per_replica), ("GPU", gpus_per_replica)):
        need, have = replicas * each, float(resources.get(name, 0.0))
        if need > have:
            return (
                f"{replicas} replicas x {each:g} {name} = {need:g} {name}s, but the Ray cluster has {have:g}: "
                f"lower --replicas or PREFIX_SERVE_RAY_{name}S_PER_REPLICA"
                + (" (or raise PREFIX_SERVE_RAY_NUM_CPUS)" if name == "CPU" else "")
            )
    return None


def deploy(settings: Settings) -> None:
    """Start Serve's HTTP proxy on settings.host:port and deploy the application; blocks until it is healthy."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    from service.scaleout.app import APP_NAME, build_application

    serve.start(
        http_options=HTTPOptions(
            host=settings.host, port=settings.port, keep_alive_timeout_s=int(settings.keep_alive_timeout_s)
        ),
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    serve.run(build_application(absolute_paths(settings)), name=APP_NAME, route_prefix="/", blocking=False)


def absolute_paths(settings: Settings) -> Settings:
    """Replicas run in other working directories: make the store, cache and model paths absolute."""
    update: dict[str, Any] = {
        "prefix_dir": settings.prefix_dir.expanduser().resolve(),
        "cache_dir": settings.cache_dir.expanduser().resolve(),
    }
    if settings.model and os.path.exists(os.path.expanduser(settings.model)):
        update["model"] = os.path.abspath(os.path.expanduser(settings.model))
    return settings.model_copy(update=update)


def shutdown(started_cluster: bool) -> None:
    import ray
    from ray import serve

    from service.scaleout.app import APP_NAME

    try:
        if started_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def serve_on_ray(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM. Returns the process exit code."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        logger.error(ray_missing_message())
        return 2
    from service.scaleout.app import gpus_per_replica

    started = time.perf_counter()
    try:
        started_cluster = start_ray(settings)
    except Exception as exc:  # noqa: BLE001 - e.g. no cluster at --ray-address: one clear line, exit 1
        logger.error("could not start or join a Ray cluster (%s): %s", settings.ray_address or "local", exc)
        return 1
    problem = resource_problem(settings, ray.cluster_resources(), gpus_per_replica(settings))
    if problem and started_cluster:
        logger.error(problem)
        shutdown(started_cluster)
        return 2
    if problem:  # a joined cluster may autoscale
        logger.warning("%s; waiting for the cluster to grow", problem)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings)
        logger.info(
            "serving on http://%s:%d with %d model replica(s) on Ray Serve (ready in %.1f s)",
            settings.host, settings.port, max(1, settings.replicas), time.perf_counter() - started,
        )
        while not stop.wait(1.0):
            pass
        logger.info("shutting down the Ray Serve application")
    except Exception:
        logger.exception("Ray Serve deployment failed")
        return 1
    finally:
        shutdown(started_cluster)
    return 0
