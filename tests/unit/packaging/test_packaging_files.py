"""Files around the chart: rendered manifests, schema, kind config, image, agent helper."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging_chart import CHART, REPO, Render, find

from defender_devcluster import tools_bin


def _run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=120, check=False, env=env, cwd=REPO
    )


def _script_env(helm_bin: Path) -> dict[str, str]:
    return {**os.environ, "DEFENDER_TOOLS_BIN": str(helm_bin.parent), "PYTHON": sys.executable}


def test_rendered_manifests_are_current(helm_bin: Path) -> None:
    proc = _run(str(REPO / "hack" / "render-manifests.sh"), "--check", env=_script_env(helm_bin))
    assert proc.returncode == 0, proc.stderr


def test_stale_manifests_are_reported(helm_bin: Path, tmp_path: Path) -> None:
    # A copy of the parts the script reads, with one chart value changed after rendering.
    for part in ("hack", "crds", "manifests"):
        shutil.copytree(REPO / part, tmp_path / part)
    shutil.copytree(CHART, tmp_path / "charts" / "ml-defender")
    values = tmp_path / "charts" / "ml-defender" / "values.yaml"
    values.write_text(values.read_text().replace("size: 1Gi", "size: 2Gi"))
    proc = _run(
        str(tmp_path / "hack" / "render-manifests.sh"), "--check", env=_script_env(helm_bin)
    )
    assert proc.returncode == 1
    assert "stale" in proc.stderr and "manifests/install.yaml" in proc.stderr


@pytest.mark.parametrize("args", [("--check",), ()])
def test_a_missing_venv_is_named_not_blamed_on_the_chart(
    helm_bin: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    # A fresh worktree has no .venv: the script must say so, not call the schema stale.
    for part in ("hack", "crds", "manifests"):
        shutil.copytree(REPO / part, tmp_path / part)
    shutil.copytree(CHART, tmp_path / "charts" / "ml-defender")
    env = {k: v for k, v in _script_env(helm_bin).items() if k != "PYTHON"}
    proc = _run(str(tmp_path / "hack" / "render-manifests.sh"), *args, env=env)
    assert proc.returncode == 1
    assert f"{tmp_path}/.venv/bin/python not found" in proc.stderr, proc.stderr
    assert "make venv" in proc.stderr and "stale" not in proc.stderr, proc.stderr
    # Found before anything is written.
    copy = tmp_path / "charts" / "ml-defender"
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == sorted(
        p.relative_to(CHART) for p in CHART.rglob("*")
    )


EXAMPLE_HELPERS = ("_agent.tpl", "_helpers.tpl")


def test_the_agent_example_holds_current_copies_of_the_chart_helpers() -> None:
    # Copies, not links: helm warns about every symlinked file in a chart it renders.
    for name in EXAMPLE_HELPERS:
        copy = CHART / "examples" / "agent-sidecar" / "templates" / name
        assert not copy.is_symlink(), f"{copy} is a symlink; run `make manifests` to copy it"
        assert copy.read_bytes() == (CHART / "templates" / name).read_bytes(), (
            f"{copy} differs from the chart's templates/{name}; run `make manifests`"
        )


def test_a_stale_helper_copy_in_the_agent_example_is_reported(
    helm_bin: Path, tmp_path: Path
) -> None:
    for part in ("hack", "crds", "manifests"):
        shutil.copytree(REPO / part, tmp_path / part)
    chart = tmp_path / "charts" / "ml-defender"
    shutil.copytree(CHART, chart)
    helper = chart / "templates" / "_agent.tpl"
    helper.write_text(helper.read_text() + "{{/* changed after the copy */}}\n")
    script = str(tmp_path / "hack" / "render-manifests.sh")
    proc = _run(script, "--check", env=_script_env(helm_bin))
    assert proc.returncode == 1
    assert "examples/agent-sidecar/templates/_agent.tpl" in proc.stderr, proc.stderr
    assert "manifests/install.yaml" not in proc.stderr, proc.stderr
    proc = _run(script, env=_script_env(helm_bin))
    assert proc.returncode == 0, proc.stderr
    for name in EXAMPLE_HELPERS:
        copy = chart / "examples" / "agent-sidecar" / "templates" / name
        assert copy.read_bytes() == (chart / "templates" / name).read_bytes()
    assert _run(script, "--check", env=_script_env(helm_bin)).returncode == 0


def test_install_yaml_creates_its_namespace_first() -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text()) if d]
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == "ml-defender"
    assert not [d for d in docs if d["kind"] == "Pod"], "helm test pods do not belong in it"
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "CustomResourceDefinition"}


def _secrets_used(node: object) -> set[str]:
    """Names of the Secrets a manifest mounts or reads an env variable from."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("secret"), dict):
            found.add(node["secret"]["secretName"])
        if isinstance(node.get("secretKeyRef"), dict):
            found.add(node["secretKeyRef"]["name"])
        for value in node.values():
            found |= _secrets_used(value)
    elif isinstance(node, list):
        for value in node:
            found |= _secrets_used(value)
    return found


INSTALL_PAGES = [
    REPO / "README.md",
    CHART / "README.md.in",
    REPO / "manifests" / "install.yaml",
    *sorted((REPO / "docs").glob("*.md")),
]
SECRETS_RENDER = "--show-only templates/etcd-secrets.yaml | kubectl apply -f -"


def test_the_documented_secrets_render_gives_every_secret_install_yaml_needs(
    render: Render,
) -> None:
    # install.yaml leaves the generated Secrets out; the documented command must make each one
    # its pods use, or they stay ContainerCreating (the keyring: the operator creates it).
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text()) if d]
    assert not [d for d in docs if d["kind"] == "Secret"]
    used = _secrets_used(docs) - {"ml-defender-keyring"}
    assert used, "the default install mounts the generated Secrets"
    made = render("--show-only", "templates/etcd-secrets.yaml", release="ml-defender")
    assert used <= {d["metadata"]["name"] for d in made}


def test_every_plain_manifests_install_renders_the_secrets_first() -> None:
    for page in INSTALL_PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(r"kubectl apply .*-f manifests/install\.yaml", line):
                before = " ".join(lines[max(0, i - 4) : i]).replace("\\ ", "")
                assert SECRETS_RENDER in " ".join(before.split()), f"{page.name}:{i + 1}: {line}"


def _code_blocks(text: str) -> list[str]:
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_helm_install_names_its_namespace_and_owns_the_crd() -> None:
    # The chart renders the CRD: a `kubectl apply -f crds/` before `helm install` makes Helm
    # refuse it (not its own) unless told to take it over or leave it out; without a namespace
    # the release lands in `default` while every doc and NOTES say ml-defender.
    seen = 0
    for page in INSTALL_PAGES:
        for block in _code_blocks(page.read_text()):
            crds_applied = False
            for line in block.replace("\\\n", " ").splitlines():
                if re.search(r"kubectl apply .*-f crds/", line):
                    crds_applied = True
                if not re.search(
                    r"helm (install|upgrade --install) \S+ charts/ml-defender(\s|$)", line
                ):
                    continue
                seen += 1
                where = f"{page.name}: {line}"
                assert re.search(r"(-n|--namespace)[ =]\S", line), where
                if crds_applied:
                    assert "--take-ownership" in line or "crds.enabled=false" in line, where
    assert seen >= 4


def _plain_uninstall() -> list[tuple[bool, set[str], dict[str, str]]]:
    """The keep-the-data commands of docs/install.md: (namespaced, kinds, label selector)."""
    text = (REPO / "docs" / "install.md").read_text()
    section = text.split("\n### Uninstalling plain manifests\n", 1)[1].split("\n## ", 1)[0]
    block = _code_blocks(section)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        found = re.search(r"kubectl (-n \S+ )?delete (\S+)\s+-l (\S+)", line)
        assert found, line
        selector = dict(pair.split("=", 1) for pair in found.group(3).split(","))
        commands.append((found.group(1) is not None, set(found.group(2).split(",")), selector))
    return commands


def test_the_plain_uninstall_keeps_the_namespace_and_crds_and_deletes_the_rest() -> None:
    # `kubectl delete -f manifests/install.yaml` would delete the namespace (etcd PVCs, Secrets,
    # keyring) and the CRD (every DefenderComponent): the documented way must leave exactly
    # those and reach every other object of the file.
    commands = _plain_uninstall()
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text()) if d]
    kept = {"Namespace", "CustomResourceDefinition"}
    for doc in docs:
        meta = doc["metadata"]
        kind = doc["kind"].lower()
        hits = [
            c
            for c in commands
            if kind in c[1]
            and c[0] == ("namespace" in meta)
            and c[2].items() <= meta.get("labels", {}).items()
        ]
        if doc["kind"] in kept:
            assert not hits, f"{doc['kind']} {meta['name']} must stay"
        else:
            assert hits, f"{doc['kind']} {meta['name']} is left behind"
    for _, kinds, _ in commands:
        assert not kinds & {"namespace", "customresourcedefinition", "secret", "pvc"}
        assert not kinds & {"persistentvolumeclaim", "crd", "ns", "all"}
    text = (REPO / "manifests" / "install.yaml").read_text()
    assert "Uninstalling plain manifests" in text.split("\n---\n", 1)[0]


def test_every_make_command_in_the_docs_exists() -> None:
    # make reads `--node` as its own (unknown) option; a variable is NAME=value.
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", makefile, flags=re.M))
    problems, seen = [], 0
    # docs/bench/ is written by bench/run.py (bench/report.py), not by hand.
    for page in [
        *sorted((REPO / "docs").glob("*.md")),
        REPO / "README.md",
        CHART / "README.md.in",
    ]:
        text = page.read_text()
        commands = re.findall(r"`(make [^`]+)`", text)
        for block in _code_blocks(text):
            commands += re.findall(r"^\s*(make [^\n#]+)", block, flags=re.M)
        for command in commands:
            for word in command.split()[1:]:
                if word.startswith("-"):
                    problems.append(f"{page.name}: `{command}`: make has no {word}")
                elif "=" in word or not re.fullmatch(r"[a-z][\w-]*", word):
                    continue
                elif word not in targets:
                    problems.append(f"{page.name}: `{command}`: no target {word}")
                else:
                    seen += 1
    assert seen > 10
    assert not problems, "\n".join(problems)


def test_schema_is_generated_from_values() -> None:
    proc = _run(sys.executable, str(REPO / "hack" / "chart-schema.py"), "--check")
    assert proc.returncode == 0, proc.stderr


def test_an_undocumented_value_is_refused(tmp_path: Path) -> None:
    hack = tmp_path / "hack"
    hack.mkdir()
    shutil.copy(REPO / "hack" / "chart-schema.py", hack)
    shutil.copytree(CHART, tmp_path / "charts" / "ml-defender")
    values = tmp_path / "charts" / "ml-defender" / "values.yaml"
    values.write_text(values.read_text() + "\nundocumented: 1\n")
    proc = _run(sys.executable, str(hack / "chart-schema.py"))
    assert proc.returncode == 1
    assert "undocumented has no `## @param undocumented" in proc.stderr


# ------------------------------------------------------------------------------------ kind

KIND_CLUSTER_KEYS = {
    "kind", "apiVersion", "name", "nodes", "networking", "featureGates", "runtimeConfig",
    "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902", "containerdConfigPatches",
    "containerdConfigPatchesJSON6902",
}  # fmt: skip
KIND_NODE_KEYS = {
    "role", "image", "labels", "extraMounts", "extraPortMappings", "kubeadmConfigPatches",
    "kubeadmConfigPatchesJSON6902",
}  # fmt: skip


def test_kind_config_is_a_cluster_with_three_workers() -> None:
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert config["kind"] == "Cluster"
    assert set(config) <= KIND_CLUSTER_KEYS, set(config) - KIND_CLUSTER_KEYS
    roles = [node["role"] for node in config["nodes"]]
    assert roles == ["control-plane", "worker", "worker", "worker"]
    for node in config["nodes"]:
        assert set(node) <= KIND_NODE_KEYS, set(node) - KIND_NODE_KEYS
        assert all(isinstance(v, str) for v in node.get("labels", {}).values())


def test_kind_script_explains_itself() -> None:
    proc = _run(str(REPO / "hack" / "kind.sh"))
    assert proc.returncode == 2
    assert "hack/kind.sh up" in proc.stderr and "helm-install" in proc.stderr


STUB_TOOLS = """#!/usr/bin/env bash
echo "tools.sh $*" >> "$LOG"
case "${1:-}" in
  --bindir) echo "$STUB_BINDIR" ;;
  --helm)
    printf '#!/usr/bin/env bash\\necho "built helm $*" >> "$LOG"\\n' > "$STUB_BINDIR/helm"
    chmod +x "$STUB_BINDIR/helm"
    echo "$STUB_BINDIR" ;;
esac
"""


def _packaging_make(tmp_path: Path, target: str, helm_on_path: bool) -> list[str]:
    """`make <target>` of the real Makefile, with hack/tools.sh stubbed (it records its calls
    and, for --helm, writes a helm that records its own) and a PATH of basic tools only."""
    root = tmp_path / "repo"
    (root / "hack").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    tools = root / "hack" / "tools.sh"
    tools.write_text(STUB_TOOLS)
    tools.chmod(0o755)
    pinned, path = tmp_path / "pinned", tmp_path / "path"
    pinned.mkdir()
    path.mkdir()
    for name in ("bash", "chmod", "make"):
        found = shutil.which(name)
        assert found, name
        (path / name).symlink_to(found)
    if helm_on_path:
        (path / "helm").write_text('#!/usr/bin/env bash\necho "path helm $*" >> "$LOG"\n')
        (path / "helm").chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": str(path), "LOG": str(log), "STUB_BINDIR": str(pinned), "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["make", "-s", target], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


def test_helm_lint_uses_the_helm_on_path_and_builds_nothing(tmp_path: Path) -> None:
    calls = _packaging_make(tmp_path, "helm-lint", helm_on_path=True)
    assert "path helm lint charts/ml-defender" in calls
    assert {c for c in calls if c.startswith("tools.sh")} == {"tools.sh --bindir"}


def test_helm_lint_without_helm_builds_helm_alone(tmp_path: Path) -> None:
    # A kind user without Go's whole toolchain (or root): helm only, never the full `make tools`.
    calls = _packaging_make(tmp_path, "helm-lint", helm_on_path=False)
    assert "tools.sh --helm" in calls
    assert {c for c in calls if c.startswith("tools.sh")} == {
        "tools.sh --bindir",
        "tools.sh --helm",
    }
    assert "built helm lint charts/ml-defender" in calls


def test_tools_helm_asks_for_helm_alone(tmp_path: Path) -> None:
    # A directory given by DEFENDER_TOOLS_DIR is taken as it is when it has what is asked for:
    # with --helm that is helm alone; the full set still needs every binary.
    (tmp_path / "helm").write_text("#!/bin/sh\n")
    (tmp_path / "helm").chmod(0o755)
    env = {**os.environ, "DEFENDER_TOOLS_DIR": str(tmp_path)}
    helm_only = _run(str(REPO / "hack" / "tools.sh"), "--helm", env=env)
    assert helm_only.returncode == 0, helm_only.stderr
    assert helm_only.stdout.strip().splitlines()[-1] == str(tmp_path)
    everything = _run(str(REPO / "hack" / "tools.sh"), env=env)
    assert everything.returncode == 1 and "lacks some of" in everything.stderr


def test_image_script_says_when_docker_is_missing(tmp_path: Path) -> None:
    # A PATH without docker: the script must stop with a message, not half-build.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("bash", "sed", "head", "dirname"):
        found = shutil.which(name)
        assert found, name
        (bindir / name).symlink_to(found)
    proc = _run(str(REPO / "hack" / "image.sh"), env={"PATH": str(bindir)})
    assert proc.returncode == 1
    assert "docker is not installed" in proc.stderr


# ------------------------------------------------------------------------------------ image


def _dockerfile() -> list[str]:
    return [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = [ln.split()[1] for ln in _dockerfile() if ln.startswith("USER ")]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)


def test_image_base_is_pinned_and_slim() -> None:
    args = [ln for ln in _dockerfile() if ln.startswith("ARG PYTHON_IMAGE=")]
    assert len(args) == 1
    image = args[0].split("=", 1)[1]
    name, _, tag = image.partition(":")
    assert name == "python"
    # A full patch version and a Debian release, never `latest` or a floating `3.11`.
    version, _, variant = tag.partition("-")
    assert version.count(".") == 2 and "slim" in variant, image
    assert all(ln.split()[1] == "${PYTHON_IMAGE}" for ln in _dockerfile() if ln.startswith("FROM "))


def test_image_installs_the_wheel_with_pinned_dependencies() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "--constraint requirements/constraints.txt" in text
    assert "pip install --no-index" in text


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") :], "allow-list: ignore everything first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "requirements/constraints.txt",
        "src",
        "operator",
    }


# ------------------------------------------------------------------------------------ agent

AGENT_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: sniffer-0
  labels:
    {{- include "ml-defender.labels" . | nindent 4 }}
spec:
  shareProcessNamespace: true
  containers:
    - name: sniffer
      image: sniffer:1
      volumeMounts:
        {{- include "ml-defender.agent.sharedMount" (dict "ctx" $) | nindent 8 }}
    {{- include "ml-defender.agent.sidecar" (dict "ctx" $ "component" "sniffer"
        "componentType" "sniffer" "process" "sniffer") | nindent 4 }}
  volumes:
    {{- include "ml-defender.agent.sidecarVolumes" (dict "ctx" $) | nindent 4 }}
"""


@pytest.fixture
def chart_with_agent_pod(tmp_path: Path) -> Path:
    chart = tmp_path / "ml-defender"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-agent-pod.yaml").write_text(AGENT_POD)
    return chart


def test_agent_sidecar_renders_settings_the_agent_accepts(
    render: Render, chart_with_agent_pod: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chart helper and defender_agent.AgentSettings are written apart: this ties them.
    from defender_agent._settings import load_agent_settings

    pod = find(render(chart=chart_with_agent_pod), "Pod", "sniffer-0")
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == "defender-agent")
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in agent["volumeMounts"]} <= volumes
    for var in agent["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    monkeypatch.setenv("POD_NAME", "sniffer-0")
    settings = load_agent_settings([])
    assert settings.component == "sniffer"
    assert len(settings.etcd_endpoints) == 3
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert str(settings.keyring_path) in mounts
    assert str(settings.output_path.parent) in mounts


def test_tools_bin_is_where_helm_came_from(helm_bin: Path) -> None:
    assert helm_bin.parent == tools_bin()
