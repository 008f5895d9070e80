#!/usr/bin/env python3
"""Generate charts/ml-defender/values.schema.json and the chart's README from values.yaml.

Types come from the default values, descriptions from the `## @param path description` comments,
and the few constraints a default cannot express (ranges, enums, patterns) from CONSTRAINTS below.
Every mapping that is not itself a documented value gets `additionalProperties: false`, so a typo
such as `etcd.replicas` is rejected by `helm install` instead of being silently ignored.

    hack/chart-schema.py           write the schema and the README's parameter tables
    hack/chart-schema.py --check   exit 1 when either file on disk is stale (used by the tests)

The README is charts/ml-defender/README.md.in with `@PARAMETERS@` replaced by one table per
`## @section` of values.yaml (Bitnami's layout: name, description, default).

A value without an `## @param` line is an error: every value is documented where it is defined.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "ml-defender"
PARAM = re.compile(r"^\s*## @param (\S+) (.+)$")
SECTION = re.compile(r"^\s*## @section (.+)$")

_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[mkMGTPE])?$"
_DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"
_ENV_LIST = {"type": "array", "items": {"type": "object", "required": ["name"]}}

# Constraints merged over the inferred schema of one value.
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "fullnameOverride": {"maxLength": 40},
    "clusterDomain": {"pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
    "imagePullSecrets": {"items": {"type": "string", "minLength": 1}},
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "image.digest": {"pattern": r"^(sha256:[a-f0-9]{64})?$"},
    "etcd.image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "etcd.image.digest": {"pattern": r"^(sha256:[a-f0-9]{64})?$"},
    "config.prefix": {"pattern": r"^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$"},
    # Durations: the settings' own bounds (defender_config._bounds, the operator's settings),
    # so helm refuses what the programs would refuse at start.
    "config.etcd.timeoutSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
    "config.etcd.retries": {"minimum": 0, "maximum": 100},
    "config.etcd.backoffBaseSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
    "config.etcd.backoffMaxSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
    "config.envelope.cipher": {"enum": ["aes-256-gcm", "chacha20-poly1305"]},
    "config.envelope.level": {"minimum": 1, "maximum": 22},
    "config.envelope.thresholdBytes": {"minimum": 0},
    "config.envelope.maxDecompressedBytes": {"minimum": 1},
    "etcd.backup.keep": {"minimum": 1},
    "etcd.backup.schedule": {"minLength": 9},
    "etcd.defrag.schedule": {"minLength": 9},
    "operator.replicaCount": {"minimum": 1, "maximum": 5},
    "operator.peering.name": {"pattern": _DNS_LABEL},
    "operator.watchNamespaces": {"items": {"type": "string", "pattern": _DNS_LABEL}},
    "operator.keyring.secretName": {"pattern": _DNS_LABEL},
    "operator.rotation.everySeconds": {"minimum": 0, "maximum": 366 * 86400},
    "operator.rotation.distributeTimeoutSeconds": {"minimum": 1, "maximum": 86400},
    "operator.rotation.graceSeconds": {"minimum": 0, "maximum": 7 * 86400},
    "operator.storageBudget.defaultBytes": {"minimum": 0},
    "operator.storageBudget.namespaces": {
        "additionalProperties": {"type": "integer", "minimum": 0},
        "propertyNames": {"pattern": _DNS_LABEL},
    },
    "operator.logFormat": {"enum": ["json", "text"]},
    "operator.logLevel": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
    "operator.healthPort": _PORT,
    "operator.metricsPort": _PORT,
    "metrics.serviceMonitor.interval": {"pattern": _DURATION},
    "metrics.dashboard.namespace": {"pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"},
    "operator.extraArgs": {"items": {"type": "string"}},
    "operator.extraEnv": _ENV_LIST,
    "operator.admission.port": _PORT,
    "operator.admission.failurePolicy": {"enum": ["Ignore", "Fail"]},
    "operator.admission.timeoutSeconds": {"minimum": 1, "maximum": 30},
    "operator.admission.certManager.issuerRef": {
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
            "group": {"type": "string", "minLength": 1},
        },
    },
    "agent.image": {"type": ["object", "null"]},
    "agent.heartbeatIntervalSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    "agent.extraEnv": _ENV_LIST,
    "agent.etcdEndpoints": {"items": {"type": "string", "pattern": r"^https?://[^/]+:[0-9]+/?$"}},
    "agent.heartbeatMisses": {"minimum": 2, "maximum": 100},
    "agent.logLevel": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
    "agent.reload.method": {"enum": ["signal", "http", "none"]},
    "agent.reload.httpMethod": {"enum": ["GET", "POST", "PUT"]},
    "agent.sharedSizeLimit": {"pattern": _QUANTITY},
    "etcd.replicaCount": {"minimum": 1, "maximum": 9},
    "etcd.ports.client": _PORT,
    "etcd.ports.peer": _PORT,
    "etcd.ports.metrics": _PORT,
    "etcd.initialClusterToken": {"minLength": 1},
    "etcd.autoCompactionMode": {"enum": ["periodic", "revision"]},
    "etcd.autoCompactionRetention": {"minLength": 1},
    "etcd.quotaBackendBytes": {"minimum": 0},
    "etcd.logLevel": {"enum": ["debug", "info", "warn", "error", "panic", "fatal"]},
    "etcd.extraEnv": _ENV_LIST,
    "etcd.persistence.size": {"pattern": _QUANTITY},
    "etcd.persistence.accessModes": {
        "minItems": 1,
        "items": {"enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]},
    },
    "etcd.podAntiAffinityPreset": {"enum": ["soft", "hard", "none"]},
    "etcd.terminationGracePeriodSeconds": {"minimum": 0},
    "etcd.startupProbe.periodSeconds": {"minimum": 1},
    "etcd.startupProbe.failureThreshold": {"minimum": 1},
    "etcd.livenessProbe.periodSeconds": {"minimum": 1},
    "etcd.livenessProbe.timeoutSeconds": {"minimum": 1},
    "etcd.livenessProbe.failureThreshold": {"minimum": 1},
    "etcd.readinessProbe.periodSeconds": {"minimum": 1},
    "etcd.readinessProbe.timeoutSeconds": {"minimum": 1},
    "etcd.readinessProbe.failureThreshold": {"minimum": 1},
    "etcd.service.type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    # null: the quorum of etcd.replicaCount (templates/_helpers.tpl).
    "etcd.pdb.minAvailable": {"type": ["integer", "null"], "minimum": 0},
    "etcd.tls.validityDays": {"minimum": 1, "maximum": 36500},
    "etcd.tls.certManager.issuerRef": {
        "required": ["name", "kind"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
            "group": {"type": "string", "minLength": 1},
        },
    },
    "etcd.tls.certManager.duration": {"pattern": _DURATION},
    "etcd.tls.certManager.renewBefore": {"pattern": _DURATION},
    "etcd.auth.operatorUser": {"pattern": _DNS_LABEL},
    "etcd.auth.healthUser": {"pattern": _DNS_LABEL},
    "etcd.auth.agentUserPrefix": {"pattern": r"^[a-z0-9][-a-z0-9]*$", "maxLength": 190},
    "agent.components": {
        "items": {
            "type": "object",
            "required": ["name", "namespace"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
                "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
            },
        }
    },
    "agent.etcdAuth.enabled": {"type": ["boolean", "null"]},
    "agent.etcdAuth.secretPrefix": {"pattern": r"^([a-z0-9][-a-z0-9.]*)?$"},
    "agent.etcdCaSecretName": {"pattern": r"^([a-z0-9][-a-z0-9.]*)?$"},
    "networkPolicy.extraClientPeers": {"items": {"type": "object"}},
    "networkPolicy.metricsFrom": {"items": {"type": "object"}},
    "externalEtcd.endpoints": {
        "items": {"type": "string", "pattern": r"^https?://[^/]+:[0-9]+/?$"}
    },
}


class SchemaError(Exception):
    """values.yaml and its documentation disagree."""


def read_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for line in text.splitlines():
        match = PARAM.match(line)
        if match:
            path, description = match.groups()
            if path in params:
                raise SchemaError(f"values.yaml documents {path} twice")
            params[path] = description.strip()
    return params


def infer(value: Any) -> dict[str, Any]:
    # bool before int: bool is an int subclass in Python.
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    if isinstance(value, dict):
        return {"type": "object"}
    if value is None:
        return {"type": "null"}
    raise SchemaError(f"cannot infer a JSON type for {value!r}")


def build(node: Any, path: str, params: dict[str, str], used: set[str]) -> dict[str, Any]:
    if path in params:
        used.add(path)
        schema = {"description": params[path], **infer(node), **CONSTRAINTS.get(path, {})}
        return schema
    if not isinstance(node, dict):
        raise SchemaError(f"{path} has no `## @param {path} ...` line in values.yaml")
    props = {}
    for key, child in node.items():
        child_path = f"{path}.{key}" if path else key
        props[key] = build(child, child_path, params, used)
    return {"type": "object", "additionalProperties": False, "properties": props}


def generate() -> str:
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    params = read_params(text)
    used: set[str] = set()
    schema = build(yaml.safe_load(text), "", params, used)
    unknown = sorted(set(params) - used)
    if unknown:
        raise SchemaError(f"@param lines name values that do not exist: {', '.join(unknown)}")
    stray = sorted(set(CONSTRAINTS) - used)
    if stray:
        raise SchemaError(f"CONSTRAINTS name values that do not exist: {', '.join(stray)}")
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "ml-defender chart values",
        "description": "Generated by hack/chart-schema.py from values.yaml; do not edit.",
        **schema,
    }
    return json.dumps(schema, indent=2) + "\n"


def _lookup(values: Any, path: str) -> Any:
    for part in path.split("."):
        values = values[part]
    return values


def readme() -> str:
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    out: list[str] = []
    for line in text.splitlines():
        section = SECTION.match(line)
        if section:
            out += ["", f"### {section.group(1).strip()}", ""]
            out += ["| Name | Description | Default |", "|---|---|---|"]
            continue
        param = PARAM.match(line)
        if param:
            path, description = param.groups()
            default = json.dumps(_lookup(values, path), separators=(",", ":"))
            cell = description.strip().replace("|", "\\|")
            out.append(f"| `{path}` | {cell} | `{default}` |")
    template = (CHART / "README.md.in").read_text(encoding="utf-8")
    return template.replace("@PARAMETERS@", "\n".join(out).strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the schema is stale")
    args = parser.parse_args()
    try:
        outputs = {CHART / "values.schema.json": generate(), CHART / "README.md": readme()}
    except SchemaError as exc:
        print(f"chart-schema: {exc}", file=sys.stderr)
        return 1
    stale = False
    for target, wanted in outputs.items():
        if args.check:
            current = target.read_text(encoding="utf-8") if target.exists() else ""
            if current != wanted:
                print(f"chart-schema: {target} is stale; run hack/chart-schema.py", file=sys.stderr)
                stale = True
        else:
            target.write_text(wanted, encoding="utf-8")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
