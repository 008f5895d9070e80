"""The plugin's connection flags and defaults. Kept apart from `_connect` so building the parser
(`--help`, argument errors) imports neither the library nor grpc, kubernetes or cryptography."""

from __future__ import annotations

import argparse
import re

DEFAULT_OPERATOR_NAMESPACE = "ml-defender"
DEFAULT_KEYRING_SECRET = "ml-defender-keyring"

# DNS-1123 subdomain: what Kubernetes accepts for a namespace (a label, stricter) or a Secret.
_KUBE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def kube_name(text: str) -> str:
    """A Kubernetes object name. An empty one would turn a get into a list (of every namespace's
    Secrets, say) in the client; any other bad one into an API error far from the flag."""
    if not _KUBE_NAME.fullmatch(text):  # `$` alone would let "ns\n" through
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Kubernetes name (lowercase letters, digits, '-' and '.',"
            " starting and ending with a letter or digit)"
        )
    return text


# The library's grammar of an etcd component name (`defender_config._layout`), repeated here so
# a bad name is an argument error before the library loads; a unit test keeps the two equal.
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


def component_name(text: str) -> str:
    """An etcd component name: one key segment. Anything else (`a/b`, `../x`) would otherwise
    reach the library's key layout, whose refusal is a plain ValueError."""
    if not _COMPONENT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a component name (1-253 letters, digits, '.', '_' and '-',"
            " starting and ending with a letter or digit; no '/')"
        )
    return text


# Every request to the Kubernetes API server waits at most this long (connect and answer). kubectl
# waits forever by default; a plugin run by a CronJob or a person must not hang on an API server
# that accepts the connection and never answers.
DEFAULT_REQUEST_TIMEOUT = 30.0
MAX_REQUEST_TIMEOUT = 3600.0
_TIMEOUT = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_TIMEOUT_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def request_timeout(text: str) -> float:
    """Seconds, from kubectl's forms (`30`, `30s`, `1m`, `1h`). More than 0: the plugin never
    waits forever; at most an hour."""
    match = _TIMEOUT.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a timeout like 30s, 2m or 90")
    seconds = float(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_REQUEST_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: more than 0 and at most {MAX_REQUEST_TIMEOUT:.0f}s"
        )
    return seconds


def secret_ref(text: str) -> tuple[str, str]:
    """`[NAMESPACE/]NAME` of a Secret as (namespace, name), each part a Kubernetes name."""
    namespace, slash, name = text.rpartition("/")
    try:
        return (kube_name(namespace) if slash else DEFAULT_OPERATOR_NAMESPACE), kube_name(name)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}; use [NAMESPACE/]NAME") from None


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
        help="comma-separated etcd client URLs, one per member, e.g."
        " https://127.0.0.1:23790,https://127.0.0.1:23791,https://127.0.0.1:23792 after a"
        " port-forward to each member (docs/operations.md#reaching-etcd); default from settings"
        " (DEFENDER_ETCD__ENDPOINTS)",
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
        type=secret_ref,
        help=f"read the keyring from this Secret (default namespace {DEFAULT_OPERATOR_NAMESPACE})",
    )
    group.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    group.add_argument("--context", help="kubeconfig context")
    group.add_argument(
        "--request-timeout",
        type=request_timeout,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="DURATION",
        help="how long each Kubernetes API request may take, connecting included, e.g. 10s, 2m"
        f" (default {DEFAULT_REQUEST_TIMEOUT:.0f}s; unlike kubectl's 0, never unbounded)",
    )
