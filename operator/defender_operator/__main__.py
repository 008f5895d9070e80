"""`python -m defender_operator` / `defender-operator`: run the operator.

Settings come from `DEFENDER_OPERATOR_*` (operator) and `DEFENDER_*` (library, etcd) env vars;
the flags below only choose how kopf runs.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import secrets
import sys

import kopf
from prometheus_client import start_http_server

from defender_config import DefenderConfigError
from defender_operator._deep_json import install as tolerate_deep_json
from defender_operator._errors import OperatorConfigurationError
from defender_operator._logging import configure
from defender_operator._settings import load_operator_settings, watch_only

_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas before any thread starts. glibc gives threads their own arenas
    (up to 8 per CPU); with the operator's worker threads, half-empty arenas held tens of MiB
    at 1,000 components. False where there is no glibc (musl) or it refuses."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="defender-operator", description=__doc__)
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="kopf liveness endpoint; it fails when etcd is unreachable for too long",
    )
    parser.add_argument(
        "--peering",
        default=None,
        help="kopf peering name for several replicas (needs the KopfPeering CRD);"
        " default: standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (highest wins); default: random, so two replicas of one"
        " Deployment never tie (kopf lets equal priorities run side by side)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    args = parser.parse_args(argv)
    watch_only(args.namespace)
    try:
        ours, _ = load_operator_settings()
    except (OperatorConfigurationError, DefenderConfigError) as exc:
        sys.stderr.write(f"defender-operator: {exc}\n")
        return 2
    configure(ours.log_format, ours.log_level)
    # Before kopf or the kubernetes client decodes any object: one DefenderComponent nested
    # deeper than Python's recursion limit (the API server takes ~10,000 levels) otherwise
    # stops the operator for every namespace and keeps it from starting (docs/security.md).
    tolerate_deep_json()
    limit_malloc_arenas()
    if ours.metrics_port:
        start_http_server(ours.metrics_port)
    namespaces = ours.watch_namespaces
    # Importing registers the handlers with kopf's default registry.
    from defender_operator import handlers  # noqa: F401

    if ours.admission_enabled:
        # kopf refuses to start with admission handlers and no server: import them only here.
        from defender_operator import webhooks  # noqa: F401

    logging.getLogger("defender_operator").info(
        "starting (%s, peering %s)",
        f"namespaces {','.join(namespaces)}" if namespaces else "cluster-wide",
        args.peering or "off",
    )
    priority = args.priority
    if priority is None:
        priority = secrets.randbelow(1_000_000) + 1
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness or None,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
