"""`make up`'s second half (system_up): CRDs applied, operator started with the right env, samples.

The operator here is a stand-in module: these tests cover how the harness starts, records and
stops it. The real operator is exercised by tests/e2e.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from defender_devcluster import ClusterState, EtcdCluster, LocalCluster, ProcessStartError
from defender_devcluster._procs import PidFile, pid_matches
from defender_devcluster._system import (
    REPO_ROOT,
    KubectlError,
    kubectl,
    start_operator,
    stop_operator,
    system_up,
    wait_established,
)

CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.system.harness.defender.test
spec:
  group: system.harness.defender.test
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                colour: {type: string}
"""


# A stand-in operator that answers its --liveness URL like kopf does, after running `body`.
LIVENESS_SERVER = """\
import http.server, sys, urllib.parse
arg = next(a for a in sys.argv if a.startswith("--liveness="))
url = urllib.parse.urlsplit(arg.split("=", 1)[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == url.path else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer((url.hostname, url.port), H).serve_forever()
"""


def fake_operator(root: Path, name: str, body: str, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root))
    return name


def test_system_up_applies_crds_samples_and_runs_the_operator(
    local_cluster: LocalCluster,
    defender_etcd: EtcdCluster,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crds, samples = tmp_path / "crds", tmp_path / "samples"
    crds.mkdir()
    samples.mkdir()
    (crds / "gadgets.yaml").write_text(CRD)
    (samples / "gadget.yaml").write_text(
        "apiVersion: system.harness.defender.test/v1\nkind: Gadget\n"
        f"metadata: {{name: sample, namespace: {namespace}}}\nspec: {{colour: blue}}\n"
    )
    seen = tmp_path / "operator-env.json"
    module = fake_operator(
        tmp_path / "py",
        "fake_operator_ok",
        textwrap.dedent(
            f"""\
        import json, os, time
        keys = ("KUBECONFIG", "DEFENDER_ETCD__ENDPOINTS", "DEFENDER_DEVCLUSTER_RUN_DIR",
                "DEFENDER_OPERATOR_NAMESPACE", "DEFENDER_OPERATOR_METRICS_PORT")
        with open({str(seen)!r}, "w") as f:
            json.dump({{k: os.environ.get(k) for k in keys}}, f)
        """
        )
        + LIVENESS_SERVER,
        monkeypatch,
    )
    out: list[str] = []
    state = system_up(
        local_cluster.run_dir, out, crds_dir=crds, samples_dir=samples, operator_module=module
    )
    try:
        assert "CRDs applied: gadgets.yaml" in out
        assert "samples applied: gadget.yaml" in out
        got = kubectl(
            local_cluster.kubeconfig, "get", "gadget", "sample", "-n", namespace, "-o", "json"
        )
        assert json.loads(got)["spec"] == {"colour": "blue"}

        (rec,) = [
            r for r in ClusterState.read(local_cluster.run_dir).processes if r.name == "operator"
        ]
        assert pid_matches(rec.pid, rec.marker)
        assert rec.health_url is not None
        assert f"liveness {rec.health_url}" in " ".join(out)
        # Liveness answered, so the stand-in had written its environment before serving.
        env = json.loads(seen.read_text())
        assert env["KUBECONFIG"] == str(local_cluster.kubeconfig)
        assert json.loads(env["DEFENDER_ETCD__ENDPOINTS"]) == defender_etcd.endpoints
        assert env["DEFENDER_DEVCLUSTER_RUN_DIR"] == str(local_cluster.run_dir)
        assert int(env["DEFENDER_OPERATOR_METRICS_PORT"]) > 0
        # The operator's namespace exists before it starts: its keyring Secret goes there.
        kubectl(local_cluster.kubeconfig, "get", "namespace", env["DEFENDER_OPERATOR_NAMESPACE"])
    finally:
        stopped = stop_operator(ClusterState.read(local_cluster.run_dir))
        kubectl(local_cluster.kubeconfig, "delete", "-f", str(crds), "--wait=false")
    assert stopped
    assert not pid_matches(rec.pid, rec.marker)
    assert state.processes[0].name == "operator", "the operator must be stopped first"


def test_missing_operator_module_is_reported_and_skipped(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    out: list[str] = []
    state = system_up(
        local_cluster.run_dir,
        out,
        crds_dir=tmp_path / "none",
        samples_dir=tmp_path / "none",
        operator_module="no_such_operator_module",
    )
    assert (
        "operator not started: module no_such_operator_module.__main__ is not importable yet" in out
    )
    assert "CRDs applied: none found in crds/" in out
    assert not any(r.name == "operator" for r in state.processes)


def test_operator_that_crashes_at_start_is_an_error_with_its_log(
    local_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = fake_operator(
        tmp_path / "py",
        "fake_operator_crash",
        'import sys\nprint("cannot reach etcd (simulated)")\nsys.exit(2)\n',
        monkeypatch,
    )
    with pytest.raises(ProcessStartError) as err:
        system_up(
            local_cluster.run_dir,
            [],
            crds_dir=tmp_path / "none",
            samples_dir=tmp_path / "none",
            operator_module=module,
        )
    assert "exited with code 2" in str(err.value)
    assert "cannot reach etcd (simulated)" in err.value.log_tail


def test_repo_crds_are_accepted_by_the_api_server(local_cluster: LocalCluster) -> None:
    # What `make up` applies must pass the real API server's CRD validation.
    files = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    assert files, "crds/ holds no CRD"
    kubectl(local_cluster.kubeconfig, "apply", "--dry-run=server", "-f", str(REPO_ROOT / "crds"))


def test_operator_that_never_becomes_live_is_stopped_and_reported(
    local_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = fake_operator(
        tmp_path / "py",
        "fake_operator_mute",
        'import time\nprint("waiting for something forever (simulated)", flush=True)\n'
        "time.sleep(600)\n",
        monkeypatch,
    )
    state = ClusterState.read(local_cluster.run_dir)
    with pytest.raises(ProcessStartError) as err:
        start_operator(state, module, ready_timeout=3)
    assert "did not answer 200 within 3s" in str(err.value)
    assert "waiting for something forever (simulated)" in err.value.log_tail
    pid_file = PidFile.read(local_cluster.run_dir / "operator" / "operator.pid")
    assert pid_file is None, "the silent operator must have been stopped"


def test_kubectl_failure_carries_the_server_message(local_cluster: LocalCluster) -> None:
    bad = '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_A_DNS_Name"}}'
    with pytest.raises(KubectlError) as err:
        kubectl(local_cluster.kubeconfig, "apply", "-n", "default", "-f", "-", stdin=bad)
    assert "Not_A_DNS_Name" in str(err.value) and "invalid" in str(err.value).lower()


def test_crd_that_never_becomes_established_times_out(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    # Two CRDs of one group claiming the same kind: the second is refused (NamesAccepted=False)
    # and never Established.
    crds = tmp_path / "crds"
    crds.mkdir()
    first = CRD.replace("system.harness", "conflict.harness")
    second = (
        first.replace("gadgets.conflict", "gizmos.conflict")
        .replace("plural: gadgets", "plural: gizmos")
        .replace("singular: gadget", "singular: gizmo")
    )
    (crds / "a.yaml").write_text(first)
    kubectl(local_cluster.kubeconfig, "apply", "-f", str(crds / "a.yaml"))
    wait_established(local_cluster.kubeconfig, crds)
    (crds / "b.yaml").write_text(second)
    try:
        kubectl(local_cluster.kubeconfig, "apply", "-f", str(crds / "b.yaml"))
        with pytest.raises(KubectlError, match=r"not Established after 3s: gizmos\."):
            wait_established(local_cluster.kubeconfig, crds, timeout=3)
        got = kubectl(local_cluster.kubeconfig, "get", "-f", str(crds / "b.yaml"), "-o", "json")
        conds = {c["type"]: c for c in json.loads(got)["status"]["conditions"]}
        assert conds["NamesAccepted"]["status"] == "False"
    finally:
        kubectl(local_cluster.kubeconfig, "delete", "-f", str(crds), "--wait=false")
