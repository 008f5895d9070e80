"""The plugin's connection flags and defaults. Kept apart from `_connect` so building the parser
(`--help`, argument errors) imports neither the library nor grpc, kubernetes or cryptography."""

from __future__ import annotations

import argparse

DEFAULT_OPERATOR_NAMESPACE = "ml-defender"
DEFAULT_KEYRING_SECRET = "ml-defender-keyring"


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--settings",
        metavar="FILE",
        help="library settings file (JSON/YAML, as in the chart's <release>-config ConfigMap);"
        " DEFENDER_* environment variables apply on top",
    )
    group.add_argument(
        "--etcd-endpoints",
        metavar="URLS",
        help="comma-separated etcd client URLs, e.g. http://127.0.0.1:2379 after"
        " `kubectl -n ml-defender port-forward svc/ml-defender-etcd 2379`",
    )
    group.add_argument("--prefix", help="etcd key prefix (default from settings: /ml-defender)")
    group.add_argument(
        "--keyring",
        metavar="PATH",
        help="keyring file or mounted Secret directory; needed by diff, history --show,"
        " rollback --direct and dump --decrypt; status checks canary rollout records with it",
    )
    group.add_argument(
        "--keyring-secret",
        metavar="[NAMESPACE/]NAME",
        help=f"read the keyring from this Secret (default namespace {DEFAULT_OPERATOR_NAMESPACE})",
    )
    group.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    group.add_argument("--context", help="kubeconfig context")
