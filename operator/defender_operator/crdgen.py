"""Render crds/defendercomponents.yaml from the pydantic models in `_api`.

    python -m defender_operator.crdgen            # write crds/defendercomponents.yaml
    python -m defender_operator.crdgen --check    # exit 1 when the committed file is stale
    python -m defender_operator.crdgen --stdout   # print it

Pydantic's JSON schema is close to what the API server wants, but a CRD schema must be
*structural*: no `$ref`, no `anyOf` carrying types, no `title`, and free-form objects marked with
`x-kubernetes-preserve-unknown-fields`. This module does that translation and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from defender_config import contract
from defender_operator import _api

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "crds" / "defendercomponents.yaml"

_DROP_KEYS = {"title"}


class CrdGenError(Exception):
    """The models cannot be rendered as a structural CRD schema (a bug in `_api`)."""


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            merged = {**_resolve(defs[name], defs)}
            # A field's own description wins over the referenced model's docstring.
            for k, v in node.items():
                if k != "$ref":
                    merged[k] = _resolve(v, defs)
            return merged
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any], where: str, *, field: bool = True) -> dict[str, Any]:
    node = {k: v for k, v in node.items() if k not in _DROP_KEYS}
    # An Optional object defaulting to None must stay absent (absent is its meaning).
    absent_by_default = False
    if "anyOf" in node:
        # Optional[X] arrives as anyOf [X, null]: absent means None, so keep X alone.
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise CrdGenError(f"{where}: only Optional[X] unions are supported, got {variants}")
        node = {k: v for k, v in {**variants[0], **node}.items() if k not in _DROP_KEYS}
        if node.get("default", ...) is None:
            del node["default"]
            absent_by_default = True
    if node.get("type") == "object":
        props = node.get("properties")
        extra = node.pop("additionalProperties", None)
        if props is not None:
            node["properties"] = {k: _structural(v, f"{where}.{k}") for k, v in props.items()}
            if node.get("required") == []:
                del node["required"]
            if "default" not in node and not node.get("required") and not absent_by_default:
                # Lets the API server fill nested defaults when the whole block is omitted.
                node["default"] = {}
            elif isinstance(node.get("default"), dict):
                node["default"] = {}
        elif extra is True or extra is None:
            node["x-kubernetes-preserve-unknown-fields"] = True
            node.pop("default", None)
        elif isinstance(extra, dict):
            node["additionalProperties"] = _structural(extra, f"{where}.*", field=False)
    if node.get("type") == "array" and "items" in node:
        node["items"] = _structural(node["items"], f"{where}[]", field=False)
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if field and "description" not in node:
        raise CrdGenError(f"{where} has no description; `kubectl explain` would show nothing")
    return node


def _strip_defaults(node: Any) -> None:
    if isinstance(node, dict):
        node.pop("default", None)
        for key, value in node.items():
            if key != "enum":
                _strip_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _strip_defaults(value)


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the served version."""
    raw = _api.DefenderComponent.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    resolved = _resolve(raw, defs)
    spec = _structural(resolved["properties"]["spec"], "spec")
    status = _structural(resolved["properties"]["status"], "status")
    spec["x-kubernetes-validations"] = _api.SPEC_VALIDATIONS
    # Status is observed, never defaulted: an absent field means "not observed yet".
    _strip_defaults(status)
    return {
        "type": "object",
        "description": (
            "A DefenderComponent is one ML Defender component (sniffer, ml-detector, firewall,"
            " rag or custom): its config versions in etcd, its pods' heartbeats and its share"
            " of the shared key."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this object (mldefender.io/v1alpha1).",
            },
            "kind": {"type": "string", "description": "DefenderComponent."},
            # The API server allows nothing but `type` here (metadata is its own schema).
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{contract.PLURAL}.{contract.API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "ml-defender",
                "app.kubernetes.io/part-of": "ml-defender",
            },
        },
        "spec": {
            "group": contract.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": _api.KIND,
                "listKind": f"{_api.KIND}List",
                "plural": contract.PLURAL,
                "singular": _api.SINGULAR,
                "shortNames": list(_api.SHORT_NAMES),
                "categories": list(_api.CATEGORIES),
            },
            "versions": [
                {
                    "name": contract.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _api.PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render() -> str:
    header = (
        "# Generated by `python -m defender_operator.crdgen` from operator/defender_operator/"
        "_api.py.\n# Do not edit by hand: change the models and re-run the generator.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defender_operator.crdgen")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail when the file is stale")
    group.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.output} is stale: run `python -m defender_operator.crdgen`\n")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
