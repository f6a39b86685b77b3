"""The coordinator's control plane is closed to sites: a real SuperLink on loopback (TLS, SuperNode authentication,
SuperExec secret) behind the real fleet front. With a site's CA certificate and signed with its key, every Control
and Runtime API request to the public address is refused and never reaches the SuperLink; a real SuperNode joins
through the front; the coordinator's own `flwr` calls on loopback still work."""

from __future__ import annotations

import json
import ssl
import subprocess
from base64 import b64encode
from pathlib import Path

import pytest

from fedsubtype.federation.fleet_front import FLEET_PATHS, is_fleet_request
from fedutil import BIN, Procs, free_port, wait_until

CONNECTION = "coordinator"


def flower_routes(prefix: str) -> dict[str, type]:
    """Flower 1.42's protobuf-over-HTTP routes under `prefix`: path -> request message type."""
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES

    return {path: t for (method, path), t in PROTOBUF_REQUEST_TYPES.items() if path.startswith(prefix)}


def test_the_allow_list_is_exactly_flowers_fleet_api():
    from flwr.superlink.routers.fleet.router import router

    assert FLEET_PATHS == set(flower_routes("/v1/fleet/"))
    assert FLEET_PATHS == {route.path for route in router.routes}
    assert not FLEET_PATHS & (set(flower_routes("/v1/control/")) | set(flower_routes("/v1/runtime/")))


@pytest.mark.parametrize("method, path, query, allowed", [
    ("POST", "/v1/fleet/pull-messages", b"", True),
    ("GET", "/v1/fleet/pull-messages", b"", False),
    ("POST", "/v1/fleet/pull-messages", b"x=1", False),
    ("POST", "/v1/fleet/pull-messages/", b"", False),
    ("POST", "/v1/fleet/../control/start-run", b"", False),
    ("POST", "/v1/fleet//pull-messages", b"", False),
    ("POST", "/V1/FLEET/pull-messages", b"", False),
    ("POST", "/v1/control/start-run", b"", False),
    ("POST", "/v1/runtime/acquire-task", b"", False),
    ("POST", "/docs", b"", False),
])
def test_only_a_post_to_a_fleet_path_passes(method, path, query, allowed):
    assert is_fleet_request(method, path, query) is allowed


def test_the_superlink_listens_on_loopback_and_guards_its_runtime_api(tmp_path):
    from fedsubtype.federation.loopback_link import LinkTLS, superexec_args, superlink_args

    tls = LinkTLS(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")
    secret = tmp_path / "s.secret"
    for link_tls in (tls, None):
        args = superlink_args(9093, link_tls, secret)
        assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "9093"
        assert args[args.index("--isolation") + 1] == "process"
        assert args[args.index("--superexec-auth-secret-file") + 1] == str(secret)
        assert "--disable-runtime-dependency-installation" in args
        assert ("--enable-supernode-auth" in args) is (link_tls is not None) and ("--insecure" in args) is (not link_tls)
        exec_args = superexec_args(9093, link_tls, secret, parent_pid=1)
        assert exec_args[exec_args.index("--runtime-api-address") + 1] == "127.0.0.1:9093"
        assert exec_args[exec_args.index("--superexec-auth-secret-file") + 1] == str(secret)
        assert "--allow-runtime-dependency-installation" not in exec_args


def test_a_busy_public_port_is_one_line_before_anything_starts(tmp_path):
    import socket

    from fedsubtype.errors import UserError
    from fedsubtype.federation.loopback_link import CoordinatorLink

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        link = CoordinatorLink("127.0.0.1", port, None, None, tmp_path / "home", tmp_path / "logs", {}, tmp_path)
        with pytest.raises(UserError) as err:
            link.start()
    assert err.value.where == "port" and str(port) in err.value.line() and "\n" not in err.value.line()
    assert link.procs == [] and not (tmp_path / "logs").exists()


def test_the_front_will_not_start_with_a_readable_key(tmp_path):
    import os
    import sys

    from fedsubtype.federation.credentials import create_dev_credentials

    creds = create_dev_credentials(tmp_path / "c", ["a"])
    os.chmod(creds.server_key, 0o644)
    res = subprocess.run([sys.executable, "-m", "fedsubtype.federation.fleet_front", "--listen", f"127.0.0.1:{free_port()}",
                          "--upstream", "127.0.0.1:1", "--certfile", str(creds.server_cert), "--keyfile",
                          str(creds.server_key), "--upstream-ca", str(creds.ca_cert)],
                         capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and f"chmod 600 {creds.server_key}" in res.stderr


# ------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """SuperLink on loopback + its SuperExec + the fleet front on a public port, started as fedsubtype-server does."""
    from fedsubtype.federation.credentials import create_dev_credentials
    from fedsubtype.federation.loopback_link import CoordinatorLink, LinkTLS

    root = tmp_path_factory.mktemp("front")
    creds = create_dev_credentials(root / "creds", ["site1", "intruder"])
    home = root / "flwr"
    coordinator = CoordinatorLink("127.0.0.1", free_port(), None, LinkTLS(creds.ca_cert, creds.server_cert,
                                  creds.server_key), home, root / "logs", {"FLWR_HOME": str(home)}, root)
    procs = Procs(root)
    try:
        coordinator.start()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{coordinator.superlink_address}"\nroot-certificates = {json.dumps(str(creds.ca_cert))}\n',
            encoding="utf-8")
        yield {"root": root, "creds": creds, "procs": procs, "link": coordinator.superlink_port,
               "public": coordinator.port, "home": home}
    finally:
        procs.close()
        coordinator.close()


def log_text(link, name: str) -> str:
    return (link["root"] / "logs" / f"{name}.log").read_text(encoding="utf-8", errors="replace")


def flwr(link, *args: str) -> subprocess.CompletedProcess:
    from fedsubtype.federation.processes import child_env

    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env=child_env({"FLWR_HOME": str(link["home"])}))


def signed_headers(key_path: Path) -> dict[str, str]:
    """The headers a SuperNode signs its Fleet requests with (Flower's NodeAuthHttpInterceptor)."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    stamp = now().isoformat()
    return {"flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode("ascii"),
            "flwr-timestamp": stamp,
            "flwr-signature": b64encode(sign_message(key, stamp.encode("ascii"))).decode("ascii"),
            "content-type": "application/protobuf", "accept": "application/protobuf"}


@pytest.mark.slow
def test_control_and_runtime_apis_are_refused_at_the_public_address(link):
    import httpx

    creds = link["creds"]
    before = len(log_text(link, "superlink"))
    public = f"https://127.0.0.1:{link['public']}"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(creds.ca_cert)), timeout=30) as client:
        routes = {**flower_routes("/v1/control/"), **flower_routes("/v1/runtime/")}
        assert len(routes) > 40
        for path, message in routes.items():
            res = client.post(public + path, content=message().SerializeToString(),
                              headers=signed_headers(creds.site_private_keys["site1"]))
            assert res.status_code in (401, 403, 404), (path, res.status_code, res.text)
        tricks = ["/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/..%2fcontrol/"
                  "list-runs", "//v1/control/list-runs", "/v1/control/list-runs?x=/v1/fleet/", "/docs", "/openapi.json",
                  "/health", "/v1/fleet/pull-messages?then=/v1/control/start-run"]
        for path in tricks:
            for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS"):
                res = client.request(method, public + path, headers=signed_headers(creds.site_private_keys["site1"]))
                assert res.status_code in (401, 403, 404), (method, path, res.status_code)
        forged = {**signed_headers(creds.site_private_keys["site1"]), "x-forwarded-for": "203.0.113.66"}
        res = client.post(public + "/v1/fleet/send-node-heartbeat", content=b"", headers=forged)
        assert res.status_code == 401, res.text  # the SuperLink's own answer: node 0 is not this key's node
    reached = log_text(link, "superlink")[before:]
    assert "/v1/control/" not in reached and "/v1/runtime/" not in reached, reached[-2000:]
    assert "send-node-heartbeat" in reached and "203.0.113.66" not in reached  # forwarded, with no forged address
    assert "refused POST '/v1/control/start-run'" in log_text(link, "fleet_front")


@pytest.mark.slow
def test_the_runtime_api_hands_tasks_only_to_the_superexec_secret(link):
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module

    with httpx.Client(verify=ssl.create_default_context(cafile=str(link["creds"].ca_cert)), timeout=30) as client:
        res = client.post(f"https://127.0.0.1:{link['link']}/v1/runtime/acquire-task",
                          content=AcquireTaskRequest().SerializeToString(),
                          headers={"content-type": "application/protobuf"})
    assert res.status_code == 401, res.text  # even on loopback, without the secret's signature


@pytest.mark.slow
def test_a_supernode_joins_through_the_front_and_the_coordinators_flwr_still_works(link):
    creds, procs = link["creds"], link["procs"]
    res = flwr(link, "supernode", "register", str(creds.site_public_keys["site1"]), CONNECTION, "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    node_id = int(json.loads(res.stdout)["node-id"])

    def supernode(name: str, key: Path) -> None:
        procs.start(name, [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link['public']}",
                           "--root-certificates", str(creds.ca_cert), "--auth-supernode-private-key", str(key),
                           "--host", "127.0.0.1", "--port", str(free_port()), "--max-wait-time", "60"],
                    env={"FLWR_HOME": str(link["root"] / f"home-{name}")})

    supernode("site1", creds.site_private_keys["site1"])

    def online() -> set[int]:
        out = flwr(link, "supernode", "ls", CONNECTION, "--format", "json")
        rows = json.loads(out.stdout).get("nodes", []) if out.returncode == 0 else []
        return {int(r["node-id"]) for r in rows if r.get("status") == "online"}

    wait_until(lambda: node_id in online(), 180, "site1's SuperNode to come online through the front", procs,
               alive="site1")
    supernode("intruder", creds.site_private_keys["intruder"])  # a key the coordinator never registered
    wait_until(lambda: procs.procs["intruder"].poll() is not None, 180, "the unregistered SuperNode to give up", procs)
    assert procs.procs["intruder"].returncode != 0
    assert online() == {node_id}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_federation_completes_through_the_front_with_the_control_plane_closed(phantom_cohort, tmp_path):
    """fedsubtype-server as sites meet it: its public port refuses the Control and Runtime APIs while its own `flwr`
    calls (registration, listing, submission) work on loopback, and a two-site federation completes."""
    import httpx
    from fedsubtype.federation.credentials import create_dev_credentials
    from fedutil import client_cmd, manifest_of, rounds, server_cmd, write_federation, write_site

    creds = create_dev_credentials(tmp_path / "creds", ["site1", "site2"]).root
    port, run_dir, sites = free_port(), tmp_path / "run", ["site1", "site2"]
    fed = write_federation(tmp_path, sites, port, creds, run_dir, rounds=1, min_sites=2, evaluate_every=0)
    procs = Procs(tmp_path)
    try:
        procs.start("server", server_cmd("--federation", str(fed)))
        wait_until(lambda: "registered site site2" in procs.text("server"), 300, "the sites' keys registered", procs)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(creds / "ca.crt")), timeout=30) as client:
            for path, message in {**flower_routes("/v1/control/"), **flower_routes("/v1/runtime/")}.items():
                res = client.post(f"https://127.0.0.1:{port}{path}", content=message().SerializeToString(),
                                  headers=signed_headers(creds / "sites" / "site1.key"))
                assert res.status_code == 404, (path, res.status_code)
        for s in sites:
            site = write_site(tmp_path, s, manifest_of(phantom_cohort), port, creds, tmp_path / "cache")
            procs.start(s, client_cmd("--site", str(site), "--quiet"))
        assert procs.wait("server", timeout=900) == 0, procs.dump()
    finally:
        procs.close()
    train = [r for r in rounds(run_dir) if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1] and sorted(a["site"] for a in train[0]["answered"]) == sites
    assert (run_dir / "model.pt").is_file()
    front_log = (run_dir / "logs" / "fleet_front.log").read_text(encoding="utf-8")
    assert "refused POST '/v1/control/start-run'" in front_log
