"""The hand-written agent sidecar pods of README.md and docs/agent.md are what the chart's agent
helpers render against the default release (the example chart, `helm template demo
charts/ml-defender/examples/agent-sidecar`): same endpoints, CA, credentials, label, volumes. A
copied example must work against the default, locked-down install."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from packaging_chart import CHART, REPO, Render, find

EXAMPLE = CHART / "examples" / "agent-sidecar"
PAGES = {
    "README.md": "## The agent beside any container",
    "docs/agent.md": "## Beside any container (plain Kubernetes)",
}


def _example(page: str) -> dict[str, Any]:
    """The first YAML block of the page's section."""
    section = (REPO / page).read_text().split(f"\n{PAGES[page]}\n", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return dict(yaml.safe_load(block))


def _contained(doc: Any, rendered: Any, where: str) -> None:
    """Everything `doc` says, `rendered` says too; lists of named items are matched by name."""
    if isinstance(doc, dict):
        assert isinstance(rendered, dict), where
        for key, value in doc.items():
            assert key in rendered, f"{where}.{key} is not rendered"
            _contained(value, rendered[key], f"{where}.{key}")
    elif isinstance(doc, list) and all(isinstance(i, dict) and "name" in i for i in doc):
        by_name = {i["name"]: i for i in rendered}
        for item in doc:
            assert item["name"] in by_name, f"{where}[{item['name']}] is not rendered"
            _contained(item, by_name[item["name"]], f"{where}[{item['name']}]")
    else:
        assert doc == rendered, f"{where}: {doc!r} != rendered {rendered!r}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_the_hand_written_sidecar_is_what_the_helpers_render(render: Render, page: str) -> None:
    rendered = find(render(chart=EXAMPLE, release="demo"), "Deployment")["spec"]["template"]
    doc = _example(page)["spec"]["template"]
    assert doc["metadata"]["labels"]["mldefender.io/etcd-client"] == "true"
    labels = rendered["metadata"]["labels"]
    assert labels["mldefender.io/etcd-client"] == "true"
    # The pod spec as written (the example's own names and labels aside).
    _contained(doc["spec"], rendered["spec"], "spec")
    # The Secrets are mounted 0440 (owner root): the agent, uid 10001, reads them only through
    # the pod's fsGroup. README's pod had none and its agent exited on `cannot read
    # .../keyring.json (Permission denied)`.
    modes = {v["secret"]["defaultMode"] for v in rendered["spec"]["volumes"] if "secret" in v}
    assert modes == {0o440}
    assert "fsGroup" in doc["spec"].get("securityContext", {}), f"{page}: no pod fsGroup"
    # And nothing the agent needs to reach the locked-down etcd is left out.
    agent = {c["name"]: c for c in rendered["spec"]["containers"]}["defender-agent"]
    written = {c["name"]: c for c in doc["spec"]["containers"]}["defender-agent"]
    needed = {e["name"] for e in agent["env"] if "ETCD" in e["name"]} | {"POD_NAME"}
    assert needed <= {e["name"] for e in written["env"]}
    assert {v["name"] for v in rendered["spec"]["volumes"]} == {
        v["name"] for v in doc["spec"]["volumes"]
    }
    assert {m["name"] for m in agent["volumeMounts"]} == {
        m["name"] for m in written["volumeMounts"]
    }


def test_the_example_chart_targets_the_default_release(render: Render) -> None:
    # The example's endpoints are the default release's members (what the pages copy).
    members = find(render(release="ml-defender"), "ConfigMap", "ml-defender-config")
    settings = yaml.safe_load(members["data"]["defender.json"])
    values = yaml.safe_load((EXAMPLE / "values.yaml").read_text())
    assert values["agent"]["etcdEndpoints"] == settings["etcd"]["endpoints"]


def test_the_pages_point_at_the_example_chart() -> None:
    for page in PAGES:
        text = " ".join((REPO / page).read_text().split())
        assert "helm template demo charts/ml-defender/examples/agent-sidecar" in text, page
        assert "render exactly this" not in text, page


def test_the_example_adds_only_the_sidecar_and_no_page_makes_ml_defender_a_dependency(
    render: Render,
) -> None:
    # ml-defender as a subchart of a component's chart installs its operator, etcd and CRDs a
    # second time: it is installed once, and a component's chart copies the helpers.
    chart = yaml.safe_load((EXAMPLE / "Chart.yaml").read_text())
    assert "dependencies" not in chart
    assert {doc["kind"] for doc in render(chart=EXAMPLE, release="demo")} == {"Deployment"}
    for page in (
        EXAMPLE / "Chart.yaml",
        CHART / "templates" / "_agent.tpl",
        REPO / "docs" / "agent.md",
        REPO / "README.md",
    ):
        text = " ".join(page.read_text().split())
        assert "as a dependency" not in text, page
