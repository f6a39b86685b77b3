"""The site's warm ClientApp executor: one long-lived process runs every task its SuperNode receives.

The SuperNode runs with `--isolation process` and a SuperExec auth secret; this process claims its tasks
on the SuperNode's Runtime API (Flower 1.42: AcquireTask → PullTaskInput → PullMessages → PushMessages →
PushTaskOutput, with the task heartbeat), exactly as `flwr-clientapp` does for one task, except that it
calls the ClientApp of the installed fedsubtype (`client.client_app:app`, imported once) and never
unpacks the FAB. A task whose app hash the site has not approved is declined before anything of it runs.

    python -m fedsubtype.federation.site_executor --site site.yaml --secret-file FILE
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedsubtype.federation.approval import DECLINE_REASON, AppApproval, decline_line, sha256_hex

CLIENT_APP_REF = "client.client_app:app"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_S = 0.2
"""How often an idle executor asks its SuperNode for a task (Flower's SuperExec: 1 s by default)."""


def load_client_app() -> ClientApp:
    """The installed fedsubtype's ClientApp, imported once from site-packages (never from a FAB)."""
    from client.client_app import app

    return app


def runtime_client(address: str, interceptors: list) -> RuntimeHttpClient:
    """A Runtime API client for the SuperNode on loopback (plain HTTP, as Flower's own SuperExec uses it)."""
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def _heartbeat_fn(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Task heartbeat; unlike Flower's it never signals the process (a lost task must not stop the site)."""
    req = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(req)
        except httpx.HTTPError:
            return False
        return True

    return beat


def _failure_reason(exc: BaseException) -> tuple[int, str]:
    """Error code and reason for a ClientApp exception, formatted as `flwr-clientapp` does."""
    return ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"


class SiteExecutor:
    """Claims the SuperNode's ClientApp tasks one at a time and runs them in this process."""

    def __init__(self, runtime_address: str, secret: bytes, app: ClientApp, approval: AppApproval, *,
                 site_name: str = "site", site_source: Path | None = None, say: Callable[[str], None] = print) -> None:
        self.address = runtime_address
        self.app = app
        self.approval = approval
        self.site_name, self.site_source, self.say = site_name, site_source, say
        self.tasks_run = 0
        self.tasks_declined = 0
        self._declined_runs: set[int] = set()
        self._acquire = runtime_client(runtime_address, [
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD})])

    def serve(self, stop: threading.Event, poll_s: float = POLL_S) -> None:
        """Run tasks until `stop` is set; a SuperNode that is away (restarting) is waited for."""
        while not stop.is_set():
            try:
                ran = self.poll_once()
            except httpx.HTTPError as exc:
                self.say(f"site executor: SuperNode runtime API not answering ({type(exc).__name__}); retrying")
                stop.wait(2.0)
                continue
            except Exception as exc:  # noqa: BLE001 - one broken task must not stop the site
                self.say(f"site executor: task abandoned ({type(exc).__name__}: {exc})")
                continue
            if not ran:
                stop.wait(poll_s)

    def poll_once(self) -> bool:
        """Claim and run one pending ClientApp task; False when there was none."""
        res = self._acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (res.HasField("task") and res.token):
            return False
        self.run_task(res.task, res.token)
        return True

    def run_task(self, task: Task, token: str) -> None:
        """One claimed task, end to end, with its heartbeat running throughout."""
        client = runtime_client(self.address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                               RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        try:
            if not self.approval.approves(task.fab_hash):
                self._decline(client, task)
            else:
                self._execute(client, task)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _decline(self, client: RuntimeHttpClient, task: Task) -> None:
        """Activate the task, answer with an error and a failed task output; nothing of the FAB is used."""
        message, context, _, _ = pull_task_input(client)
        if task.run_id not in self._declined_runs:  # one line per run, not per message
            self._declined_runs.add(task.run_id)
            self.say(decline_line(self.site_name, task.run_id, task.fab_hash, self.site_source))
        push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=DECLINE_REASON), reply_to=message),
                     context)
        push_task_output(client=client, context=context, sub_status=SubStatus.FAILED, details=DECLINE_REASON)
        self.tasks_declined += 1

    def _execute(self, client: RuntimeHttpClient, task: Task) -> None:
        """Pull the message, run the installed ClientApp on it, push the reply and the task's outcome."""
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, _, fab = pull_task_input(client)
            if sha256_hex(fab.content) != task.fab_hash:  # the SuperNode holds other bytes than it announced
                raise RuntimeError("the FAB does not match its announced hash")
            self.say(f"site executor: run {task.run_id}: {message.metadata.message_type} message")
            reply = self.app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - a failing task must leave the warm process up
            code, details = _failure_reason(exc)
            self.say(f"site executor: run {task.run_id}: task failed: {details}")
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        self.tasks_run += 1

    def close(self) -> None:
        self._acquire.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedsubtype.federation.site_executor",
                                description="Run a site's ClientApp tasks in one warm process (started by "
                                            "fedsubtype-client; not meant to be run by hand).")
    p.add_argument("--site", type=Path, required=True, help="the site's site.yaml")
    p.add_argument("--secret-file", type=Path, required=True, help="the SuperExec auth secret shared with the SuperNode")
    p.add_argument("--runtime-api", default=None, help="the SuperNode's runtime API (default 127.0.0.1:<local_port>)")
    return p


def prepare_app(app: ClientApp, site_source: Path) -> None:
    """Load the site's data index and settings before the first task, so round one pays no start-up."""
    import client.client_app as module

    prepare = getattr(module, "prepare_site", None)
    if prepare is not None:
        prepare(str(site_source))


def main(argv: Sequence[str] | None = None) -> int:
    from fedsubtype.federation.site_config import load_site_config

    args = build_parser().parse_args(argv)
    site = load_site_config(args.site)
    approval = AppApproval.for_site(site)
    app = load_client_app()
    prepare_app(app, site.source)  # type: ignore[arg-type]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    executor = SiteExecutor(args.runtime_api or f"127.0.0.1:{site.local_port}", args.secret_file.read_bytes(), app,
                            approval, site_name=site.name, site_source=site.source,
                            say=lambda line: print(line, flush=True))
    approved = sorted(h[:12] for h in approval.hashes())
    print(f"site executor: ready (pid {os.getpid()}), {len(approved)} approved app hash(es): "
          f"{', '.join(approved) or 'none'}", flush=True)
    try:
        executor.serve(stop)
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    from fedsubtype.cli import run_guarded

    sys.exit(run_guarded("fedsubtype site executor", main))
