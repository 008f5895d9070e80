"""`python -m defender_operator` / `defender-operator`: run the operator.

Settings come from `DEFENDER_OPERATOR_*` (operator) and `DEFENDER_*` (library, etcd) env vars;
the flags below only choose how kopf runs.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys

import kopf
from prometheus_client import start_http_server

from defender_config import DefenderConfigError
from defender_operator._errors import OperatorConfigurationError
from defender_operator._logging import configure
from defender_operator._settings import load_operator_settings


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
    try:
        ours, _ = load_operator_settings()
    except (OperatorConfigurationError, DefenderConfigError) as exc:
        sys.stderr.write(f"defender-operator: {exc}\n")
        return 2
    configure(ours.log_format, ours.log_level)
    if ours.metrics_port:
        start_http_server(ours.metrics_port)
    namespaces = args.namespace or ours.watch_namespaces
    # Importing registers the handlers with kopf's default registry.
    from defender_operator import _login, handlers  # noqa: F401

    _login.watched_namespaces = len(namespaces)

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
