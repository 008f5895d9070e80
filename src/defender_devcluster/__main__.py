"""``python -m defender_devcluster {up,down,status,system-up,system-down} --run-dir DIR``.

``python -m defender_devcluster images ...`` builds the node's OCI image archives (its own
options: ``images --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import ssl
import sys
from pathlib import Path

from ._cluster import ClusterState, LocalCluster, etcd_health, process_alive, stop_run_dir
from ._errors import DevClusterError, StateError
from ._http import get_text, http_ok
from ._journey import NAMESPACE as JOURNEY_NAMESPACE
from ._journey import RELEASE as JOURNEY_RELEASE
from ._journey import try_lines as journey_try_lines
from ._node import recover_stale_nodes
from ._system import stop_operator, system_up
from ._tools import tools_bin

log = logging.getLogger("defender_devcluster")


def _readyz(state: ClusterState) -> str:
    pki = Path(state.run_dir) / "kube" / "pki"
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        status, body = get_text(f"{state.api_url}/readyz", context=ctx, timeout=5)
    except (OSError, ssl.SSLError) as exc:
        return f"unreachable ({exc.__class__.__name__}: {exc})"
    return body.strip() if status == 200 else f"HTTP {status}: {body.strip()[:200]}"


ENV_FILE = "env.sh"
# With a node: the plugin's way to the chart's etcd, to `source` after env.sh.
ETCD_ENV_FILE = "etcd.sh"
# The chart's default member count, which the journey keeps; one port-forward per member.
CHART_ETCD_MEMBERS = 3
# How long etcd.sh waits for each port-forward to listen (tries of 0.2 s).
FORWARD_WAIT_TRIES = 150


def _exports(state: ClusterState) -> list[str]:
    # The built kubectl and the venv's kubectl-defender plugin first on PATH; the plugin and the
    # library read the defender etcd endpoints from DEFENDER_ETCD__ENDPOINTS.
    path = f"{tools_bin()}:{Path(sys.executable).parent}"
    exports = [
        f"export KUBECONFIG={shlex.quote(state.kubeconfig)}",
        f'export PATH="{path}:$PATH"',
    ]
    if state.node_ip is not None:
        # The components' etcd is then the chart's, in pods; the harness's three members
        # serve nothing of the system, and pointing the plugin at them showed "No components
        # registered" on a running system.
        etcd_sh = shlex.quote(str(Path(state.run_dir) / ETCD_ENV_FILE))
        return [*exports, f"# kubectl defender needs the chart's etcd: source {etcd_sh}"]
    endpoints = json.dumps(list(state.etcd_endpoints))
    return [*exports, f"export DEFENDER_ETCD__ENDPOINTS={shlex.quote(endpoints)}"]


def _etcd_script(state: ClusterState) -> str:
    """docs/operations.md "Reaching etcd" for the journey's release, as a file to `source`.

    Each forward takes a local port the kernel hands out (`:2379`) and the endpoints are read
    from what kubectl printed. With fixed ports (23790-23792) a second cluster on the machine
    (another clone's `make up`, another engineer's) found them taken: its forwards failed, the
    wait found the first cluster's listening, and the plugin talked to the wrong etcd."""
    ns, release = JOURNEY_NAMESPACE, JOURNEY_RELEASE
    run_dir = Path(state.run_dir)
    ca = shlex.quote(str(run_dir / "etcd-ca.crt"))
    log = shlex.quote(str(run_dir / "port-forward-")) + "$i.log"
    members = " ".join(str(i) for i in range(CHART_ETCD_MEMBERS))
    return "\n".join(
        [
            f"# kubectl defender on the chart's etcd of the cluster in {state.run_dir}:",
            "# one port-forward per member, the CA, the operator's etcd user (docs/operations.md,",
            '# "Reaching etcd"). `kill $DEFENDER_PORT_FORWARDS` stops the forwards; `make down`',
            "# ends them too.",
            "DEFENDER_PORT_FORWARDS=",
            "_defender_endpoints=",
            f"for i in {members}; do",
            f"  _defender_log={log}",
            f"  kubectl -n {ns} port-forward --address 127.0.0.1 pod/{release}-etcd-$i :2379"
            ' >"$_defender_log" 2>&1 &',
            "  _defender_pid=$!",
            '  DEFENDER_PORT_FORWARDS="$DEFENDER_PORT_FORWARDS $_defender_pid"',
            "  # kubectl prints the port it listens on once it does.",
            "  _defender_port=",
            f"  for _ in $(seq {FORWARD_WAIT_TRIES}); do",
            "    _defender_port=$(sed -n"
            " 's/^Forwarding from 127\\.0\\.0\\.1:\\([0-9][0-9]*\\) .*/\\1/p' \"$_defender_log\")",
            '    [ -n "$_defender_port" ] && break',
            "    kill -0 $_defender_pid 2>/dev/null || break",
            "    sleep 0.2",
            "  done",
            '  if [ -z "$_defender_port" ]; then',
            f'    echo "etcd.sh: no port-forward to pod/{release}-etcd-$i in namespace {ns}:'
            ' $(tail -n 3 "$_defender_log")" >&2',
            "    kill $DEFENDER_PORT_FORWARDS 2>/dev/null",
            "    DEFENDER_PORT_FORWARDS=",
            "    return 1",
            "  fi",
            '  _defender_endpoints="${_defender_endpoints:+$_defender_endpoints,}'
            'https://127.0.0.1:$_defender_port"',
            "done",
            f"kubectl -n {ns} get secret {release}-etcd-client-tls"
            f" -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > {ca}",
            'export DEFENDER_ETCD__ENDPOINTS="$_defender_endpoints"',
            f"export DEFENDER_ETCD__CA_FILE={ca}",
            f"export DEFENDER_ETCD__USER={release}-operator",
            f'export DEFENDER_ETCD__PASSWORD="$(kubectl -n {ns} get secret {release}-etcd-auth'
            " -o jsonpath='{.data.operator}' | base64 -d)\"",
            "unset _defender_log _defender_pid _defender_port _defender_endpoints",
            "",
        ]
    )


def write_env_file(state: ClusterState) -> Path:
    """The exports for a shell that uses this cluster, as `<run dir>/env.sh` to `source`: kept
    out of the shell's profile, so they are gone with the shell (the test suite ignores them
    anyway, see `pytest_plugin`). With a node, also `etcd.sh` for the plugin."""
    path = Path(state.run_dir) / ENV_FILE
    header = f"# ML Defender local cluster (run dir {state.run_dir}); `make down` stops it.\n"
    path.write_text(header + "\n".join(_exports(state)) + "\n")
    etcd_sh = Path(state.run_dir) / ETCD_ENV_FILE
    if state.node_ip is not None:
        etcd_sh.write_text(_etcd_script(state))
    else:
        # A node run's, left in the same run dir: it would forward to pods that do not exist.
        etcd_sh.unlink(missing_ok=True)
    return path


def _try_lines(state: ClusterState) -> list[str]:
    lines = [
        f"source {shlex.quote(str(write_env_file(state)))}",
        "kubectl get --raw /readyz",
        "kubectl get defendercomponents -A",
    ]
    if state.node_ip is not None:
        etcd_sh = shlex.quote(str(Path(state.run_dir) / ETCD_ENV_FILE))
        lines.append(f"source {etcd_sh}     # port-forwards to the chart's etcd, for the plugin")
    return [*lines, "kubectl defender status"]


def cmd_up(run_dir: Path, node: bool = False, images: tuple[Path, ...] | None = None) -> int:
    try:
        state = ClusterState.read(run_dir)
    except StateError:
        state = None
    alive = state is not None and all(process_alive(p) for p in state.processes)
    if state is not None and alive and _readyz(state) == "ok":
        print(f"already up: {state.api_url} (run dir {run_dir})")
        return 0
    cluster = LocalCluster(run_dir, node=node, images=images).start()
    state = ClusterState.read(run_dir)
    print(f"local cluster up in {cluster.start_seconds:.1f}s (run dir {run_dir})")
    print(f"  kube-apiserver  {state.api_url}")
    if state.node_ip is not None:
        print(
            f"  node            {state.node_ip} (netns {state.node_netns}, pods {state.pod_cidr})"
        )
    print(f"  defender etcd   {','.join(state.etcd_endpoints)}")
    print(f"  kubeconfig      {state.kubeconfig}")
    print(*_try_lines(state), sep="\n")
    return 0


def cmd_down(run_dir: Path) -> int:
    stopped = stop_run_dir(run_dir)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    if os.geteuid() == 0:
        # Nodes of killed runs (any run dir) too: their host rules break later runs' nodes.
        try:
            swept = recover_stale_nodes(keep=None)
        except (DevClusterError, OSError) as exc:
            print(f"warning: could not sweep the nodes of dead runs: {exc}", file=sys.stderr)
        else:
            if swept:
                print(f"removed the nodes of dead runs in: {', '.join(map(str, swept))}")
    return 0


def cmd_status(run_dir: Path) -> int:
    state = ClusterState.read(run_dir)
    ok = True
    print(f"run dir      {state.run_dir}")
    print(f"kubeconfig   {state.kubeconfig}")
    for rec in state.processes:
        alive = process_alive(rec)
        ok &= alive
        line = f"  {rec.name:<26} pid {rec.pid:<8} {'running' if alive else 'NOT RUNNING'}"
        if rec.health_url:
            healthy = alive and http_ok(rec.health_url)
            ok &= healthy
            line += f"  {rec.health_url} {'ok' if healthy else 'NOT OK'}"
        print(line)
    ready = _readyz(state)
    ok &= ready == "ok"
    print(f"kube-apiserver {state.api_url} readyz: {ready}")
    for ep, healthy in etcd_health(state.etcd_endpoints).items():
        ok &= healthy
        print(f"defender etcd  {ep} {'healthy' if healthy else 'UNHEALTHY'}")
    return 0 if ok else 1


def cmd_system_up(run_dir: Path) -> int:
    lines: list[str] = []
    state = system_up(run_dir, lines)
    print(*lines, sep="\n")
    print("\nTry:")
    if state.node_ip is None:
        print(*_try_lines(state), sep="\n")
    else:
        # The components' etcd is the chart's, in pods (TLS, etcd auth), not the harness's.
        print(*_try_lines(state)[:2], *journey_try_lines(), *_try_lines(state)[3:], sep="\n")
    return 0


def cmd_system_down(run_dir: Path) -> int:
    try:
        state = ClusterState.read(run_dir)
    except StateError:
        state = None
    if state is not None and stop_operator(state):
        print("operator stopped")
    return cmd_down(run_dir)


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "system-up": cmd_system_up,
    "system-down": cmd_system_down,
}


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["images"]:
        from ._images_cli import images_main

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        return images_main(args_in[1:])
    parser = argparse.ArgumentParser(
        prog="defender-devcluster",
        description="Local kube-apiserver/controller-manager/scheduler and 3-member defender etcd.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--run-dir", type=Path, default=Path(".devcluster"))
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--node",
        action="store_true",
        help="up: also run a node (containerd, kubelet, kube-proxy, CoreDNS); needs root",
    )
    parser.add_argument(
        "--image",
        dest="images",
        action="append",
        type=Path,
        default=[],
        help="up --node: an OCI image archive to import into the node (repeatable; default: "
        "the pause image and every archive `make images` built)",
    )
    args = parser.parse_args(args_in)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    run_dir: Path = args.run_dir.resolve()
    try:
        if args.command == "up":
            images = tuple(args.images) if args.images else None
            return cmd_up(run_dir, node=args.node, images=images)
        return COMMANDS[args.command](run_dir)
    except DevClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
