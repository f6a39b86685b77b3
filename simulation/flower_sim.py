"""The one place that starts Flower's simulation engine (`flwr.simulation.run_simulation`, Ray backend).

Flower 1.42 marks `run_simulation` as deprecated in favour of `flwr run` against a local simulation
SuperLink, which cannot yet give each virtual node its own node config, join an existing Ray cluster, or
run app objects wrapped in-process (docs/simulation.md, "Why not `flwr run`"). Switching is this file only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from fedsubtype.federation.launch import RUN_DIR_KEY

from .scenario import FaultSpec, RaySpec

PARTITION_ID_KEY = "partition-id"  # what Flower's simulation engine puts in each virtual node's config


def ray_start_timeout(exc: BaseException) -> bool:
    """True when the engine failed because Ray's node did not come up in time (an overloaded machine)."""
    seen: BaseException | None = exc
    while seen is not None:
        if "timed out during startup" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def corrupt_reply(reply: Any, message: Any, fault: FaultSpec) -> None:
    """SIMULATION ONLY: turn a site's honest training reply into a faulty or hostile one, in place."""
    if fault.kind == "inflate_examples":
        if "metrics" in reply.content.metric_records:
            reply.content["metrics"]["num-examples"] = float(reply.content["metrics"]["num-examples"]) * fault.factor
        return
    if "arrays" not in reply.content.array_records:  # secure aggregation: the reply holds a masked vector only
        return
    sent = message.content["arrays"].to_numpy_ndarrays()
    got = reply.content["arrays"].to_numpy_ndarrays()
    if fault.kind == "nan":
        bad = [np.full_like(g, np.nan) for g in got]
    elif fault.kind == "sign_flip":
        bad = [(s - fault.factor * (g - s)).astype(g.dtype) for s, g in zip(sent, got)]
    else:  # scale
        bad = [(s + fault.factor * (g - s)).astype(g.dtype) for s, g in zip(sent, got)]
    from flwr.app import ArrayRecord

    reply.content["arrays"] = ArrayRecord(bad)


class SiteNodeClientApp:
    """The real ClientApp, with virtual SuperNode i given site i's node config (as `--node-config` would).

    Picklable, so Ray actors receive it. The scenario's `fault` (simulation only) corrupts one virtual site's
    training replies after the real app produced them; nothing else about the app changes.
    """

    def __init__(self, app: Any, node_configs: dict[int, dict[str, str]], fault: FaultSpec | None = None) -> None:
        self.app = app
        self.node_configs = node_configs
        self.fault = fault

    def __call__(self, message: Any, context: Any) -> Any:
        partition = int(context.node_config[PARTITION_ID_KEY])
        context.node_config.update(self.node_configs[partition])
        reply = self.app(message=message, context=context)
        fault = self.fault
        if (fault is not None and fault.kind and partition == fault.site and not reply.has_error()
                and message.metadata.message_type.split(".")[0] == "train"):
            corrupt_reply(reply, message, fault)
        return reply


class RunConfigServerApp:
    """The real ServerApp, given the run config that `flwr run` would pass (the run folder)."""

    def __init__(self, app: Any, run_config: dict[str, Any]) -> None:
        self.app = app
        self.run_config = run_config

    def __call__(self, grid: Any, context: Any) -> None:
        context.run_config.update(self.run_config)
        self.app(grid=grid, context=context)


def backend_config(ray: RaySpec) -> dict[str, Any]:
    """Ray resources: each virtual node's CPUs/GPUs; join `ray.address` when given, else start Ray locally."""
    init_args: dict[str, Any] = ({"address": ray.address} if ray.address
                                 else {"num_cpus": ray.num_cpus or os.cpu_count() or 1})
    return {"client_resources": {"num_cpus": ray.client_cpus, "num_gpus": ray.client_gpus}, "init_args": init_args}


def quiet_engine(verbose: bool) -> None:
    """Keep the engine's per-round progress lines; silence Ray's start-up chatter unless verbose."""
    if verbose:
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.getLogger("ray").setLevel(logging.ERROR)


def run_on_simulation_engine(run_dir: str, node_configs: dict[int, dict[str, str]], ray: RaySpec,
                             verbose: bool = False, fault: FaultSpec | None = None) -> None:
    """The deployment's ServerApp (run folder `run_dir`) and ClientApp on one virtual SuperNode per node config
    (with the scenario's simulation-only `fault` applied to one of them)."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import app as server_app

    quiet_engine(verbose)
    run_simulation(server_app=RunConfigServerApp(server_app, {RUN_DIR_KEY: run_dir}),
                   client_app=SiteNodeClientApp(client_app, node_configs, fault),
                   num_supernodes=len(node_configs), backend_config=backend_config(ray), verbose_logging=verbose)
