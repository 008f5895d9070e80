"""Command line: flags, dispatch, and turning library errors into one readable line.

Only argparse and the light helpers load at start: `--help` and argument errors answer before
the library (and grpc, kubernetes, cryptography, pydantic under it) is imported, which is most of
the plugin's start-up time. A command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._errors import TOO_DEEP, CliError, api_server_unreachable
from ._flags import (
    DEFAULT_KEYRING_SECRET,
    DEFAULT_OPERATOR_NAMESPACE,
    add_connection_flags,
    component_name,
    kube_name,
)
from ._output import Printer, printable_data

if TYPE_CHECKING:
    from defender_config import RollbackTarget

    from ._connect import Connection

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 15m, 2h or 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def positive_duration(text: str) -> timedelta:
    """A duration of at least one second (a wait of 0 would give up before the first look)."""
    value = duration(text)
    if value.total_seconds() < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is too short; at least 1s")
    return value


def count(text: str) -> int:
    """A whole number of at least 0 (a negative --limit would silently drop the oldest)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; 0 means no limit")
    return value


#: spec.rollout.historyLimit's maximum (the library's contract names it, MAX_HISTORY_LIMIT; this
#: module does not import the library while it parses arguments, and a test keeps them equal).
HISTORY_LIMIT_MAX = 1000


def history_limit(text: str) -> int:
    """`--history-limit`: 1 to HISTORY_LIMIT_MAX versions, spec.rollout.historyLimit's range. 0
    would keep no version to roll back to (the library refuses it); more than any spec may hold
    is a typo, and the operator's next write would prune to the spec anyway."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= HISTORY_LIMIT_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: keep 1 to {HISTORY_LIMIT_MAX} versions, as"
            " spec.rollout.historyLimit"
        )
    return value


def rollback_target(text: str) -> RollbackTarget:
    # The contract's one grammar (the operator reads the annotation with it too). It lives in
    # the library, so only a rollback's --to loads the library while arguments are parsed.
    from defender_config import InvalidRollbackTargetError, parse_rollback_target

    try:
        return parse_rollback_target(text)
    except InvalidRollbackTargetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl defender",
        description="Look at and steer the ML Defender config plane (etcd + operator).",
        # A port-forward per member: defrag needs every member, status shows each one's health
        # through its own endpoint. The chart's certificates name 127.0.0.1.
        epilog="Reach etcd from outside the cluster with one port-forward per member, e.g. "
        "`kubectl -n ml-defender port-forward pod/ml-defender-etcd-0 23790:2379` (and -1, -2), "
        "then --etcd-endpoints https://127.0.0.1:23790,https://127.0.0.1:23791,"
        "https://127.0.0.1:23792 with the CA and an etcd user in DEFENDER_ETCD__CA_FILE, "
        "DEFENDER_ETCD__USER and DEFENDER_ETCD__PASSWORD (docs/operations.md#reaching-etcd).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    colour = common.add_mutually_exclusive_group()
    colour.add_argument(
        "--color",
        dest="colour",
        action="store_true",
        default=None,
        help="colour the table even when not on a terminal (default: only on a terminal,"
        " never with NO_COLOR set)",
    )
    colour.add_argument(
        "--no-color", dest="colour", action="store_false", help="never colour the table"
    )
    add_connection_flags(common)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "status", parents=[common], help="components, versions, instances, heartbeats, alerts"
    )
    p.add_argument("component", nargs="?", type=component_name, help="only this component")
    p.add_argument(
        "--alerts-since",
        type=duration,
        default=timedelta(hours=1),
        metavar="DURATION",
        help="the ALERTS column counts alerts this recent, e.g. 30m, 2h, 7d (default 1h)",
    )

    p = sub.add_parser(
        "diff", parents=[common], help="MASTER vs ACTIVE config (exit 1 when they differ)"
    )
    p.add_argument("component", type=component_name, help="the component (its etcd name)")

    p = sub.add_parser("history", parents=[common], help="kept versions of ACTIVE")
    p.add_argument("component", type=component_name, help="the component (its etcd name)")
    p.add_argument(
        "--show", type=int, metavar="VERSION", help="print that version's config (decrypts)"
    )

    p = sub.add_parser(
        "rollback", parents=[common], help="make MASTER or an older version ACTIVE again"
    )
    p.add_argument(
        "component",
        type=component_name,
        help="DefenderComponent name (etcd component name with --direct)",
    )
    p.add_argument(
        "--to", type=rollback_target, default="master", help="master (default) or a version"
    )
    p.add_argument(
        "-n",
        "--namespace",
        type=kube_name,
        default="default",
        help="namespace of the DefenderComponent (with --direct: where its"
        " spec.rollout.historyLimit is read)",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="write etcd through the library instead of asking the operator (needs a keyring);"
        " break-glass for when the operator is down. Like the operator it prunes the history to"
        " the DefenderComponent's spec.rollout.historyLimit, read through the Kubernetes API;"
        " when that cannot be read, to the store's default, said on stderr",
    )
    p.add_argument(
        "--history-limit",
        type=history_limit,
        metavar="N",
        help=f"with --direct: keep N versions of ACTIVE (1 to {HISTORY_LIMIT_MAX}) instead of"
        " the DefenderComponent's spec.rollout.historyLimit; the resource is then not read",
    )

    for action, helptext in (
        ("promote", "promote a canary rollout to every instance now (skip the hold)"),
        ("abort", "abort a canary rollout: canaries back on ACTIVE, commits frozen"),
    ):
        p = sub.add_parser(action, parents=[common], help=helptext)
        p.add_argument("component", help="DefenderComponent name")
        p.add_argument(
            "-n",
            "--namespace",
            type=kube_name,
            default="default",
            help="namespace of the DefenderComponent",
        )

    p = sub.add_parser(
        "rotate-key", parents=[common], help="ask the operator to rotate the shared key"
    )
    p.add_argument(
        "--operator-namespace",
        type=kube_name,
        default=DEFAULT_OPERATOR_NAMESPACE,
        help="namespace of the operator and its keyring Secret"
        f" (default {DEFAULT_OPERATOR_NAMESPACE})",
    )
    p.add_argument(
        "--secret", type=kube_name, default=DEFAULT_KEYRING_SECRET, help="the keyring Secret's name"
    )

    p = sub.add_parser(
        "keyring",
        help="export / import the shared keyring: the one thing to keep safe (docs/security.md)",
    )
    actions = p.add_subparsers(dest="keyring_command", required=True, metavar="ACTION")
    for action, helptext in (
        ("export", "write the keyring to a file (passphrase-wrapped with --passphrase-*)"),
        ("import", "write the keyring Secret from an export, if it opens every stored value"),
    ):
        k = actions.add_parser(action, parents=[common], help=helptext)
        k.add_argument("-f", "--file", required=True, type=Path, help="the export file")
        k.add_argument(
            "--operator-namespace",
            type=kube_name,
            default=DEFAULT_OPERATOR_NAMESPACE,
            help="namespace of the operator and its keyring Secret"
            f" (default {DEFAULT_OPERATOR_NAMESPACE})",
        )
        k.add_argument(
            "--secret", type=kube_name, default=DEFAULT_KEYRING_SECRET, help="the keyring Secret"
        )
        k.add_argument(
            "--passphrase-file", metavar="FILE", help="passphrase in the first line of FILE"
        )
        k.add_argument(
            "--passphrase-env", metavar="NAME", help="passphrase in environment variable NAME"
        )
        if action == "export":
            k.add_argument("--force", action="store_true", help="overwrite an existing file")
        else:
            k.add_argument(
                "--raw", action="store_true", help="FILE is a plain keyring.json from a Secret"
            )
            k.add_argument(
                "--replace", action="store_true", help="overwrite an existing keyring Secret"
            )

    p = sub.add_parser("alerts", parents=[common], help="misconfiguration alerts, newest first")
    p.add_argument("component", nargs="?", type=component_name, help="only this component")
    p.add_argument("--since", type=duration, metavar="DURATION", help="e.g. 30m, 2h, 7d")
    p.add_argument("--limit", type=count, default=50, help="at most this many (0: all)")

    p = sub.add_parser(
        "backup",
        parents=[common],
        help="snapshot etcd from a healthy member, verify it, keep the newest --keep",
    )
    p.add_argument("--dir", required=True, type=Path, help="directory of the snapshots")
    p.add_argument("--keep", type=int, default=7, help="snapshots to keep (default 7)")
    p.add_argument("--etcdutl", help="etcdutl binary (default: on PATH) to check revision/keys")

    p = sub.add_parser(
        "restore",
        parents=[common],
        help="verify a snapshot and print (or --run) the etcdutl restore of every member",
    )
    p.add_argument(
        "--snapshot", required=True, type=Path, help="the snapshot file (from `backup`) to restore"
    )
    p.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="NAME=PEER_URL",
        help="each member of the new cluster, in order (repeat)",
    )
    p.add_argument(
        "--data-dir", required=True, help="each member's new data directory; {name} is replaced"
    )
    p.add_argument(
        "--token",
        help="initial cluster token of the new cluster, never one used before (default: one"
        " named for the time, ml-defender-etcd-restored-YYYYMMDDTHHMMSSZ)",
    )
    p.add_argument("--etcdutl", help="etcdutl binary (default: on PATH)")
    p.add_argument(
        "--run", action="store_true", help="run the restores here (data dirs on this machine)"
    )

    p = sub.add_parser(
        "defrag",
        parents=[common],
        help="defragment every member, followers first, leader last, one at a time",
    )
    p.add_argument("--compact", action="store_true", help="first compact to the current revision")
    p.add_argument(
        "--disarm-nospace",
        action="store_true",
        help="afterwards clear NOSPACE alarms (docs/troubleshooting.md#storenospace)",
    )
    p.add_argument(
        "--settle-timeout",
        type=positive_duration,
        default=timedelta(seconds=60),
        metavar="DURATION",
        help="how long to wait for a member to apply the compaction, to serve again after its"
        " defrag, or to apply the disarm, before stopping with an error (default 60s)",
    )

    p = sub.add_parser(
        "dump", parents=[common], help="every key for debugging (sealed values stay sealed)"
    )
    p.add_argument(
        "key_prefix",
        nargs="?",
        metavar="PREFIX",
        help="only keys under this prefix, relative to --prefix, e.g. components/sniffer",
    )
    p.add_argument(
        "--decrypt",
        action="store_true",
        help="open sealed values: prints configs in clear text; needs --keyring/--keyring-secret",
    )
    return parser


def run(args: argparse.Namespace, printer: Printer) -> int:
    from . import _commands as cmd
    from . import _etcd_commands as etcd
    from ._connect import Connection

    conn = Connection(args)
    try:
        data: Any
        show: Callable[[Printer, Any], None]
        exit_code = 0
        if args.command == "status":
            # With a keyring the rollout record's MAC is checked, as instances check it.
            with_keys = bool(args.keyring or args.keyring_secret)
            client = conn.client(keyring=conn.keyring("status") if with_keys else None)
            data = cmd.collect_status(client, args.component, args.alerts_since)
            data["etcd"] = etcd.collect_etcd(client)
            show = _show_status
        elif args.command == "backup":
            tool = etcd.find_etcdutl(args.etcdutl)
            data = etcd.backup(conn.client(), args.dir, args.keep, tool)
            show = etcd.show_backup
        elif args.command == "restore":
            tool = etcd.find_etcdutl(args.etcdutl)
            data = etcd.restore(
                args.snapshot,
                args.member,
                args.data_dir,
                args.token,
                tool,
                run=args.run,
            )
            show = etcd.show_restore
        elif args.command == "defrag":
            data = etcd.defrag(
                conn.client(),
                compact=args.compact,
                disarm_nospace=args.disarm_nospace,
                settle_timeout=args.settle_timeout.total_seconds(),
                printer=printer if args.output == "table" else None,
            )
            show = etcd.show_defrag
        elif args.command == "alerts":
            data = cmd.collect_alerts(conn.client(), args.component, args.since, args.limit or None)
            show = cmd.show_alerts
        elif args.command == "diff":
            data = cmd.collect_diff(conn.client(keyring=conn.keyring("diff")), args.component)
            show = cmd.show_diff
            exit_code = 0 if data["identical"] else 1
        elif args.command == "history":
            needs_keys = args.show is not None or bool(args.keyring or args.keyring_secret)
            client = conn.client(keyring=conn.keyring("history --show") if needs_keys else None)
            data = cmd.collect_history(client, args.component, decrypt=needs_keys, show=args.show)
            show = cmd.show_history
        elif args.command == "rollback":
            if args.direct:
                client = conn.client(keyring=conn.keyring("rollback --direct"))
                # The flag, else the resource's spec (read only then), else the store's default
                # with a warning: a break-glass rollback is not refused for want of the API.
                found = (
                    None
                    if args.history_limit is not None
                    else cmd.read_component(
                        conn.kube,
                        args.namespace,
                        args.component,
                        request_timeout=args.request_timeout,
                    )
                )
                choice = cmd.choose_history_limit(
                    args.history_limit,
                    found,
                    cmd.store_history_limit(client),
                    where=cmd.component_ref(args.namespace, args.component),
                )
                if choice.warning is not None:
                    printer.warn(f"kubectl defender rollback: warning: {choice.warning}")
                data = cmd.rollback_direct(client, args.component, args.to, choice)
            else:
                data = cmd.annotate_rollback(conn.kube(), args.namespace, args.component, args.to)
            show = _show_done
        elif args.command in ("promote", "abort"):
            data = cmd.annotate_rollout(conn.kube(), args.namespace, args.component, args.command)
            show = _show_done
        elif args.command == "rotate-key":
            data = cmd.annotate_rotation(conn.kube(), args.operator_namespace, args.secret)
            show = _show_done
        elif args.command == "keyring":
            data = _keyring(conn, args)
            show = _show_keyring
        elif args.command == "dump":
            keyring = conn.keyring("dump --decrypt") if args.decrypt else None
            data = cmd.collect_dump(
                conn.client(keyring=keyring), args.key_prefix, decrypt=args.decrypt
            )
            show = cmd.show_dump
        else:  # pragma: no cover - argparse refuses unknown commands
            raise CliError(f"unknown command {args.command}")
        if args.output == "json":
            printer.json(data)
        else:
            show(printer, printable_data(data))
        return exit_code
    finally:
        conn.close()


def _show_status(printer: Printer, data: dict[str, Any]) -> None:
    from . import _commands as cmd
    from . import _etcd_commands as etcd

    cmd.show_status(printer, data)
    printer.line()
    etcd.show_etcd(printer, data["etcd"])


def _keyring(conn: Connection, args: argparse.Namespace) -> dict[str, Any]:
    from . import _keyring_commands as keys

    if (
        args.keyring_command == "import"
        and args.raw
        and (args.passphrase_file or args.passphrase_env)
    ):
        # A plain keyring.json is not wrapped: a passphrase given with it would be ignored, and
        # whoever gave it expects it to be used (likely a wrapped export named with --raw).
        raise CliError(
            "--raw reads a plain keyring.json, which has no passphrase: drop --passphrase-file /"
            " --passphrase-env, or drop --raw for a passphrase-protected export"
        )
    passphrase = keys.read_passphrase(
        args.passphrase_file, args.passphrase_env, exporting=args.keyring_command == "export"
    )
    if args.keyring_command == "export":
        return keys.export_keyring(
            conn.kube(),
            args.operator_namespace,
            args.secret,
            args.file,
            passphrase,
            force=args.force,
        )
    # The file first: a wrong one is reported as such, not as whatever reaching Kubernetes or
    # etcd with it in hand fails with.
    loaded = keys.load_import(args.file, passphrase, raw=args.raw)
    return keys.import_keyring(
        conn.kube(),
        conn.client(),
        args.operator_namespace,
        args.secret,
        args.file,
        loaded,
        replace=args.replace,
    )


def _show_keyring(printer: Printer, data: dict[str, Any]) -> None:
    rows = [[k["id"], k["state"], k["fingerprint"]] for k in data["keys"]]
    printer.table(["KEY ID", "STATE", "FINGERPRINT"], rows)
    if "exported" in data:
        wrapped = "passphrase-protected" if data["protected"] else "NOT passphrase-protected"
        printer.line(
            f"Exported Secret {data['secret']} to {data['file']} ({wrapped}). Keep this file"
            " safe and apart from etcd snapshots: without it a lost Secret means every stored"
            " config is unreadable."
        )
    else:
        printer.line(
            f"{'Replaced' if data['replaced'] else 'Created'} Secret {data['secret']} from"
            f" {data['file']}; it opens all {data['sealedValuesOpened']} sealed value(s). The"
            " operator picks it up within its rotation interval."
        )


# Where `rollback --direct`'s history limit came from, as the table says it.
_LIMIT_FROM = {
    "flag": "--history-limit",
    "spec": "spec.rollout.historyLimit",
    "crd-default": "spec.rollout.historyLimit unset: the CRD's default",
    "store-default": "the store's default",
}


def _show_done(printer: Printer, data: dict[str, Any]) -> None:
    if "annotation" in data:
        printer.line(
            f"Rotation requested on Secret {data['secret']} ({data['annotation']}). Follow it with"
            " `kubectl get defendercomponents -A -o wide` (ROTATION column)."
        )
    elif "rollout" in data:
        printer.line(
            f"Asked the operator to {data['rollout']} the canary rollout of"
            f" {data['namespace']}/{data['component']} ({data['via']}). Watch: kubectl -n"
            f" {data['namespace']} get defendercomponent {data['component']}"
            " -o jsonpath='{.status.rollout}'"
        )
    elif data["via"] == "etcd":
        printer.line(
            f"{data['component']}: ACTIVE is now version {data['activeVersion']}"
            f" (a copy of {data['rolledBackTo']}); the history keeps {data['historyLimit']}"
            f" versions ({_LIMIT_FROM[data['historyLimitFrom']]})."
        )
    else:
        printer.line(
            f"Asked the operator to roll {data['namespace']}/{data['component']} back to"
            f" {data['rolledBackTo']} ({data['via']}). Watch: kubectl -n {data['namespace']}"
            f" describe defendercomponent {data['component']}"
        )


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    conflict = _conflicting_flags(args)
    if conflict is not None:
        parser.error(conflict)
    printer = Printer.for_stream(out, args.colour, err=err)
    errors = err if err is not None else sys.stderr
    # gRPC's core logs every failed TLS handshake to stderr at INFO, some twenty lines before
    # the plugin's own one-line error; set before the library imports grpc. An explicit
    # setting of the caller's is kept.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # Parsing succeeded, so the command runs and needs the library anyway.
    from defender_config import DefenderConfigError, EnvelopeError, StoreUnavailableError

    try:
        return run(args, printer)
    except BrokenPipeError:
        # The reader stopped reading (`| head`): not the command's failure, and no traceback.
        # Stdout goes to /dev/null so the interpreter's last flush does not raise again; 141
        # is what a shell reports for a writer that SIGPIPE ended.
        if out is None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CliError as exc:
        errors.write(f"kubectl defender {args.command}: {exc}\n")
        return exc.exit_code
    except StoreUnavailableError as exc:
        check = "check --etcd-endpoints, the port-forward and `kubectl -n ml-defender get pods`"
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            check = (
                "the members' certificates do not verify: set DEFENDER_ETCD__CA_FILE to the etcd"
                " CA (docs/operations.md#reaching-etcd)"
            )
        errors.write(f"kubectl defender {args.command}: etcd is unavailable ({exc}); {check}\n")
        return 2
    except EnvelopeError as exc:
        errors.write(
            f"kubectl defender {args.command}: {exc.reason}: {exc} (docs/troubleshooting.md#"
            f"{exc.reason.lower()})\n"
        )
        return 2
    except DefenderConfigError as exc:
        errors.write(f"kubectl defender {args.command}: {type(exc).__name__}: {exc}\n")
        return 2
    except RecursionError:
        # Decoding someone else's data that the command did not bound itself (the Kubernetes
        # client's json.loads of an answer, a YAML loader): the data's fault, not a bug; the
        # stack is unwound by now. Where the command knows what it read, it says so
        # (`too_deep`); this is the net under every other decoder.
        errors.write(
            f"kubectl defender {args.command}: an answer of the API server or a file read is"
            f" {TOO_DEEP}\n"
        )
        return 2
    except Exception as exc:
        unreachable = api_server_unreachable(exc, getattr(args, "request_timeout", None))
        if unreachable is None:
            raise
        errors.write(
            f"kubectl defender {args.command}: the Kubernetes API server does not answer"
            f" ({unreachable}); check --kubeconfig / --context and that the server runs\n"
        )
        return 2


def _conflicting_flags(args: argparse.Namespace) -> str | None:
    """Flags that parse one by one and make no sense together, as an argument error (exit 2):
    one a person gave expecting it to be used would otherwise be ignored."""
    if args.command == "rollback" and args.history_limit is not None and not args.direct:
        return (
            "rollback --history-limit needs --direct: without it the operator rolls back and"
            " keeps the DefenderComponent's spec.rollout.historyLimit"
        )
    return None
