"""`make up`'s second half (system_up): CRDs applied, operator started with the right env, samples.

The operator here is a stand-in module: these tests cover how the harness starts, records and
stops it. The real operator is exercised by tests/e2e.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from defender_devcluster import ClusterState, EtcdCluster, LocalCluster, ProcessStartError
from defender_devcluster._procs import pid_matches
from defender_devcluster._system import REPO_ROOT, kubectl, stop_operator, system_up

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
        f"""\
        import json, os, time
        keys = ("KUBECONFIG", "DEFENDER_ETCD__ENDPOINTS", "DEFENDER_DEVCLUSTER_RUN_DIR")
        with open({str(seen)!r}, "w") as f:
            json.dump({{k: os.environ.get(k) for k in keys}}, f)
        time.sleep(600)
        """,
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
        deadline = time.monotonic() + 30
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        env = json.loads(seen.read_text())
        assert env["KUBECONFIG"] == str(local_cluster.kubeconfig)
        assert json.loads(env["DEFENDER_ETCD__ENDPOINTS"]) == defender_etcd.endpoints
        assert env["DEFENDER_DEVCLUSTER_RUN_DIR"] == str(local_cluster.run_dir)
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
