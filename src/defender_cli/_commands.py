"""The plugin's commands. Each `collect_*` reads the store and returns plain data (what `-o json`
prints); each `show_*` turns that data into a table. Commands that change something ask the
operator through an annotation, or with --direct use the library like the operator would."""

from __future__ import annotations

import difflib
import getpass
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from defender_config import (
    Alert,
    ConfigStore,
    DefenderClient,
    DefenderConfigError,
    Registry,
    RollbackTarget,
    RolloutRecord,
    format_rollback_target,
    inspect,
    is_envelope,
)
from defender_config.contract import (
    ABORT_ANNOTATION,
    API_GROUP,
    API_VERSION,
    DEFAULT_HISTORY_LIMIT,
    MAX_HISTORY_LIMIT,
    PLURAL,
    PROMOTE_ANNOTATION,
    ROLLBACK_ANNOTATION,
    ROTATE_ANNOTATION,
)

from ._errors import TOO_DEEP, CliError, api_server_unreachable
from ._output import Printer, age, seconds_since, shorten


def who() -> str:
    try:
        return f"kubectl-defender:{getpass.getuser()}"
    except (KeyError, OSError):
        return "kubectl-defender"


# ------------------------------------------------------------------------------------- alerts


def collect_alerts(
    client: DefenderClient,
    component: str | None = None,
    since: timedelta | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Alert records, newest first. Unreadable records are listed with an `error`."""
    layout = client.layout
    prefix = layout.component_alerts_dir(component) if component else layout.alerts_dir
    cutoff = datetime.now(UTC) - since if since is not None else None
    alerts: list[dict[str, Any]] = []
    for stored in client.store.list_prefix(prefix):
        try:
            alert = Alert.model_validate(client.decode_json(stored.key, stored.value))
        except (DefenderConfigError, ValidationError, ValueError) as exc:
            alerts.append({"key": stored.key, "error": shorten(str(exc), 200)})
            continue
        if cutoff is not None and alert.time < cutoff:
            continue
        record = alert.model_dump(mode="json")
        record["key"] = stored.key
        alerts.append(record)
    alerts.sort(key=lambda a: a.get("time", ""), reverse=True)
    return alerts[:limit] if limit else alerts


def show_alerts(printer: Printer, alerts: list[dict[str, Any]]) -> None:
    if not alerts:
        printer.line("No alerts.")
        return
    rows = []
    for a in alerts:
        if "error" in a:
            rows.append(["-", "-", printer.paint("unreadable", "red"), a["key"], a["error"]])
            continue
        when = datetime.fromisoformat(a["time"])
        rows.append(
            [
                age(when),
                a["component"],
                printer.paint(a["kind"], "red" if a["kind"][0].isupper() else "yellow"),
                a.get("instance") or "-",
                shorten(a["detail"], 100),
            ]
        )
    printer.table(["AGE", "COMPONENT", "KIND", "INSTANCE", "DETAIL"], rows)


# ------------------------------------------------------------------------------------- status


def collect_status(
    client: DefenderClient, component: str | None = None, alert_window: timedelta | None = None
) -> dict[str, Any]:
    window = alert_window or timedelta(hours=1)
    now = datetime.now(UTC)
    registry = Registry(client)
    summaries = registry.list_components()
    if component is not None:
        summaries = [s for s in summaries if s.name == component]
        if not summaries:
            raise CliError(
                f"component {component!r} is not registered under {client.layout.prefix}/"
                "components/; check the name (`kubectl defender status` lists them) and --prefix"
            )
    alerts = collect_alerts(client, component, since=window)
    per_component: dict[str, int] = {}
    for a in alerts:
        if "component" in a:
            per_component[a["component"]] = per_component.get(a["component"], 0) + 1
    components = []
    for s in summaries:
        instances = []
        for hb in sorted(s.instances, key=lambda h: h.instance):
            # A beat is a lease keep-alive; the record's time is its last content change.
            seen = min(registry.last_seen(hb), now)
            instances.append(
                {
                    "instance": hb.instance,
                    "pod": hb.pod,
                    "node": hb.node_id,
                    "status": hb.status.value,
                    "configVersion": hb.config_version,
                    "configDigest": hb.config_digest,
                    "softwareVersion": hb.software_version,
                    "keyFingerprint": hb.key_fingerprint,
                    "codec": hb.codec,
                    "heartbeatTime": seen.isoformat(),
                    "heartbeatAgeSeconds": seconds_since(seen, now),
                    "lastError": hb.last_error.model_dump() if hb.last_error else None,
                    # With a keyring: whether its MAC verified (the operator ignores the
                    # others) and why not; without one nothing can be told (None).
                    "verified": hb.verified if client.verifies_records else None,
                    "unverified": hb.unverified,
                }
            )
        components.append(
            {
                "name": s.name,
                "type": s.type,
                "status": s.status.value if s.status else None,
                "activeVersion": s.active_version,
                "activeDigest": s.active_digest,
                "lastModified": s.last_modified.isoformat() if s.last_modified else None,
                "modifiedBy": s.modified_by,
                "instances": instances,
                "alerts": per_component.get(s.name, 0),
                "rollout": _read_rollout(client, s.name, s.active_version, instances, now),
                "frozen": _read_freeze(client, s.name, now),
            }
        )
    return {
        "prefix": client.layout.prefix,
        "alertWindowSeconds": int(window.total_seconds()),
        "components": components,
    }


def _behind(instance: dict[str, Any], component: dict[str, Any]) -> bool:
    """Whether the instance runs something else than ACTIVE. Readers skip a new ACTIVE version
    whose config they already run (a canary's abort writes the config it built on again, a
    rollback may name the config in force), so such an instance keeps reporting the older
    number: judged by the number alone it read as behind for good."""
    active = component.get("activeVersion")
    if not active or instance["configVersion"] == active:
        return False
    digest = component.get("activeDigest")
    return digest is None or instance["configDigest"] != digest


def _read_rollout(
    client: DefenderClient,
    component: str,
    active_version: int | None,
    instances: list[dict[str, Any]],
    now: datetime,
) -> dict[str, Any] | None:
    """The canary rollout record of `component` as etcd holds it (None: no rollout, or an ended
    one). Read like
    the instances read it: with a keyring its MAC must verify, without one it is shown but
    marked unverified (an instance without a keyring ignores it)."""
    path = client.layout.rollout(component)
    stored = client.store.get(path)
    if stored is None:
        return None
    try:
        data = client.decode_record(path, stored.value, component=component, report=False)
        record = RolloutRecord.model_validate(data)
    except (DefenderConfigError, ValidationError, ValueError) as exc:
        return {"phase": "Unreadable", "error": shorten(str(exc), 200)}
    if record.ended:
        return None  # what `Rollouts.end` leaves (no canaries): no rollout in progress
    return rollout_view(
        record.model_dump(mode="json"),
        verified=client.verifies_records,
        active_version=active_version,
        instances=instances,
        now=now,
    )


def rollout_view(
    record: dict[str, Any],
    *,
    verified: bool,
    active_version: int | None,
    instances: list[dict[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """What status shows of a rollout record (`RolloutRecord` as JSON): `Progressing` while it
    builds on ACTIVE, `Stale` when ACTIVE moved on (instances ignore it), and which canaries
    already report the candidate (their heartbeat's config digest is the record's)."""
    since = datetime.fromisoformat(record["since"])
    beating = {i["instance"]: i for i in instances}
    adopted = [
        name
        for name in record["canaries"]
        if name in beating and beating[name]["configDigest"] == record["digest"]
    ]
    return {
        "phase": "Progressing" if record["base_version"] == active_version else "Stale",
        "version": record["version"],
        "baseVersion": record["base_version"],
        "digest": record["digest"],
        "canaries": list(record["canaries"]),
        "adopted": adopted,
        "since": since.isoformat(),
        "ageSeconds": seconds_since(since, now),
        "by": record["by"],
        "verified": verified,
    }


def _read_freeze(client: DefenderClient, component: str, now: datetime) -> dict[str, Any] | None:
    """The freeze record (a breaker trip or a canary abort), None when commits are open."""
    try:
        freeze = ConfigStore(client).frozen(component)
    except DefenderConfigError as exc:
        return {"reason": f"freeze record unreadable: {shorten(str(exc), 200)}", "since": None}
    if freeze is None:
        return None
    return {
        "reason": freeze.reason,
        "since": freeze.since.isoformat(),
        "ageSeconds": seconds_since(freeze.since, now),
        "by": freeze.by,
    }


def _rollout_cell(printer: Printer, rollout: dict[str, Any] | None) -> str:
    if rollout is None:
        return "-"
    if "error" in rollout:
        return printer.paint(rollout["phase"], "red")
    text = f"{rollout['phase']} v{rollout['version']} {len(rollout['adopted'])}/"
    text += f"{len(rollout['canaries'])}"
    return printer.paint(text, "yellow" if rollout["phase"] == "Progressing" else "red")


def show_status(printer: Printer, data: dict[str, Any]) -> None:
    components = data["components"]
    if not components:
        printer.line(f"No components registered under {data['prefix']}/components/.")
        return
    rows = []
    for c in components:
        ages = [i["heartbeatAgeSeconds"] for i in c["instances"]]
        newest = min(ages) if ages else None
        alerts = str(c["alerts"])
        rows.append(
            [
                c["name"],
                c["type"] or "-",
                printer.status(c["status"] or "Unknown"),
                str(c["activeVersion"] or "-"),
                str(len(c["instances"])),
                _age_seconds(newest),
                printer.paint(alerts, "red") if c["alerts"] else alerts,
                _rollout_cell(printer, c.get("rollout")),
            ]
        )
    window = data["alertWindowSeconds"] // 60
    printer.table(
        [
            "COMPONENT",
            "TYPE",
            "STATUS",
            "VERSION",
            "INSTANCES",
            "HEARTBEAT",
            f"ALERTS({window}m)",
            "ROLLOUT",
        ],
        rows,
    )
    _show_rollouts(printer, components)
    instance_rows = []
    for c in components:
        rollout = c.get("rollout") or {}
        for i in c["instances"]:
            version = str(i["configVersion"] or "-")
            canary = i["instance"] in rollout.get("canaries", ())
            if canary and i["configDigest"] == rollout.get("digest"):
                version = printer.paint(f"{version} (canary)", "blue")
            elif _behind(i, c):
                version = printer.paint(f"{version} (behind)", "yellow")
            error = i["lastError"]
            name = i["instance"]
            if i.get("verified") is False:
                name = printer.paint(f"{name} (unverified)", "red")
            instance_rows.append(
                [
                    c["name"],
                    name,
                    i["node"] or "-",
                    printer.status(i["status"]),
                    version,
                    i["softwareVersion"] or "-",
                    _age_seconds(i["heartbeatAgeSeconds"]),
                    i["keyFingerprint"] or "-",
                    printer.paint(error["reason"], "red") if error else "-",
                ]
            )
    if instance_rows:
        printer.line()
        printer.table(
            [
                "COMPONENT",
                "INSTANCE",
                "NODE",
                "STATUS",
                "CONFIG",
                "SOFTWARE",
                "HEARTBEAT",
                "KEY",
                "ERROR",
            ],
            instance_rows,
        )


def _show_rollouts(printer: Printer, components: list[dict[str, Any]]) -> None:
    """The rollouts in progress and the frozen components, below the component table."""
    rows = []
    for c in components:
        r = c.get("rollout")
        if r is None:
            continue
        if "error" in r:
            rows.append(
                [c["name"], printer.paint(r["phase"], "red"), "-", "-", r["error"], "-", "-"]
            )
            continue
        phase = r["phase"] if r["verified"] else f"{r['phase']} (unverified)"
        rows.append(
            [
                c["name"],
                printer.paint(phase, "yellow" if r["phase"] == "Progressing" else "red"),
                f"{r['baseVersion']} -> {r['version']}",
                f"{len(r['adopted'])}/{len(r['canaries'])}",
                ",".join(r["canaries"]),
                _age_seconds(r["ageSeconds"]),
                r["by"],
            ]
        )
    if rows:
        printer.line()
        printer.table(
            ["COMPONENT", "ROLLOUT", "VERSION", "ADOPTED", "CANARIES", "SINCE", "BY"], rows
        )
    frozen = [(c["name"], c["frozen"]) for c in components if c.get("frozen")]
    if frozen:
        printer.line()
    for name, f in frozen:
        by = f" by {f['by']}" if f.get("by") else ""
        since = f" for {_age_seconds(f['ageSeconds'])}" if f.get("since") else ""
        printer.line(printer.paint(f"{name}: commits frozen{since}{by}: ", "red") + f["reason"])


def _age_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return age(datetime.now(UTC) - timedelta(seconds=seconds))


# ------------------------------------------------------------------------------------- diff


def pretty(config: Any) -> list[str]:
    return json.dumps(config, indent=2, sort_keys=True).splitlines()


def collect_diff(client: DefenderClient, component: str) -> dict[str, Any]:
    configs = ConfigStore(client)
    master = configs.get_master(component)
    active = configs.get_active(component)
    lines = list(
        difflib.unified_diff(
            pretty(master),
            pretty(active.config),
            fromfile=f"{component}/master_config",
            tofile=f"{component}/active_config (version {active.version})",
            lineterm="",
        )
    )
    return {
        "component": component,
        "activeVersion": active.version,
        "identical": not lines,
        "diff": lines,
    }


def show_diff(printer: Printer, data: dict[str, Any]) -> None:
    if data["identical"]:
        printer.line(
            f"{data['component']}: ACTIVE (version {data['activeVersion']}) equals MASTER."
        )
        return
    for line in data["diff"]:
        if line.startswith(("+++", "---")):
            printer.line(printer.paint(line, "bold"))
        elif line.startswith("@@"):
            printer.line(printer.paint(line, "blue"))
        elif line.startswith("+"):
            printer.line(printer.paint(line, "green"))
        elif line.startswith("-"):
            printer.line(printer.paint(line, "red"))
        else:
            printer.line(line)


# ------------------------------------------------------------------------------------- history


def collect_history(
    client: DefenderClient, component: str, *, decrypt: bool, show: int | None = None
) -> dict[str, Any]:
    configs = ConfigStore(client)
    meta = configs.get_metadata(component)
    if meta is None:
        raise CliError(
            f"component {component!r} has no metadata under {client.layout.prefix}/components/;"
            " check the name and --prefix"
        )
    versions: list[dict[str, Any]] = []
    for stored in client.store.list_prefix(client.layout.history_dir(component)):
        parsed = client.layout.parse(stored.key)
        if parsed is None or parsed.version is None:
            continue
        entry: dict[str, Any] = {
            "version": parsed.version,
            "size": len(stored.value),
            "active": parsed.version == meta.version,
            "keyId": inspect(stored.value).key_id if is_envelope(stored.value) else None,
            "modifiedBy": meta.authors.get(str(parsed.version)),
        }
        versions.append(entry)
    if decrypt:
        by_version = {h.version: h for h in configs.history(component)}
        for entry in versions:
            found = by_version.get(entry["version"])
            entry["digest"] = found.digest if found else None
    data: dict[str, Any] = {
        "component": component,
        "activeVersion": meta.version,
        "lastModified": meta.last_modified.isoformat(),
        "modifiedBy": meta.modified_by,
        # Without a keyring the record's MAC is not checked: who changed what is shown as etcd
        # holds it, which anyone with etcd write access may have edited.
        "verified": client.verifies_records,
        "versions": sorted(versions, key=lambda v: v["version"]),
    }
    if show is not None:
        wanted = [h for h in configs.history(component) if h.version == show]
        if not wanted:
            kept = ", ".join(str(v["version"]) for v in data["versions"]) or "none"
            raise CliError(f"{component} keeps no version {show} (kept: {kept})")
        data["config"] = wanted[0].config
    return data


def show_history(printer: Printer, data: dict[str, Any]) -> None:
    if "config" in data:
        for line in pretty(data["config"]):
            printer.line(line)
        return
    printer.line(
        f"{data['component']}: ACTIVE is version {data['activeVersion']}, modified by "
        f"{data['modifiedBy']} at {data['lastModified']}"
    )
    headers = ["VERSION", "SIZE", "KEY", "DIGEST", "BY", ""]
    rows = []
    for v in reversed(data["versions"]):
        digest = v.get("digest")
        rows.append(
            [
                str(v["version"]),
                str(v["size"]),
                v["keyId"] or "-",
                digest[:12] if digest else "-",
                v.get("modifiedBy") or "-",
                printer.paint("active", "green") if v["active"] else "",
            ]
        )
    printer.table(headers, rows)
    if not data["verified"]:
        printer.line(
            "(authors as stored in etcd, not verified: --keyring or --keyring-secret checks"
            " the record's MAC)"
        )


# ------------------------------------------------------------------------------------- dump


def collect_dump(
    client: DefenderClient, prefix: str | None, *, decrypt: bool
) -> list[dict[str, Any]]:
    full = None
    if prefix:
        full = (
            prefix
            if prefix.startswith(client.layout.prefix)
            else f"{client.layout.prefix}/{prefix.lstrip('/')}"
        )
    entries = []
    for e in client.dump(full, decrypt=decrypt):
        entries.append(
            {
                "key": e.key,
                "modRevision": e.mod_revision,
                "version": e.version,
                "lease": e.lease_id or None,
                "size": e.size,
                "sealed": e.sealed,
                "header": e.header,
                "value": e.value,
                "error": e.error,
            }
        )
    return entries


def show_dump(printer: Printer, entries: list[dict[str, Any]]) -> None:
    if not entries:
        printer.line("No keys.")
        return
    rows = []
    for e in entries:
        if e["error"]:
            shown = printer.paint(shorten(e["error"], 80), "red")
        elif e["sealed"] and e["value"] is None:
            h = e["header"] or {}
            shown = printer.paint(
                f"<sealed key={h.get('key_id') or '-'} codec={h.get('codec') or '-'}"
                f" {h.get('declared_length')}B>",
                "dim",
            )
        else:
            value = e["value"]
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            shown = shorten(text, 80)
        rows.append([e["key"], str(e["modRevision"]), str(e["size"]), shown])
    printer.table(["KEY", "REV", "SIZE", "VALUE"], rows)


# ------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Unreadable:
    """The DefenderComponent could not be read: `why`, one clause for a person."""

    why: str


HistoryLimitFrom = Literal["flag", "spec", "crd-default", "store-default"]


@dataclass(frozen=True)
class HistoryLimitChoice:
    """How many versions `rollback --direct` keeps, where that number came from, and the
    warning to show when it is not the component's own (None: nothing to say)."""

    limit: int
    source: HistoryLimitFrom
    warning: str | None = None


def component_ref(namespace: str, name: str) -> str:
    return f"defendercomponent {namespace}/{name}"


def choose_history_limit(
    flag: int | None,
    found: Mapping[str, Any] | Unreadable | None,
    store_default: int,
    *,
    where: str,
) -> HistoryLimitChoice:
    """The history limit of a rollback written without the operator: `--history-limit` when
    given; else `spec.rollout.historyLimit` of the DefenderComponent `found` (as the API server
    answered it; the CRD's default when unset), which the operator would have kept; else, the
    resource unreadable or its value not one the CRD allows, `store_default` and a warning.
    `found` is None only when the flag made reading it needless. `where` names the resource."""
    if flag is not None:
        return HistoryLimitChoice(flag, "flag")
    if found is None:
        raise ValueError("without --history-limit the DefenderComponent must have been read")
    if isinstance(found, Unreadable):
        problem = f"cannot read {where} ({found.why})"
    else:
        spec = found.get("spec", {})
        rollout = spec.get("rollout", {}) if isinstance(spec, Mapping) else None
        if not isinstance(rollout, Mapping):
            problem = f"{where} has no spec.rollout mapping"
        else:
            value = rollout.get("historyLimit")
            if value is None:
                # The API server fills in the CRD's default when it serves the object; an object
                # served without it (a CRD of an older release) keeps what that default was.
                return HistoryLimitChoice(DEFAULT_HISTORY_LIMIT, "crd-default")
            # bool is an int to Python, not to the CRD.
            if type(value) is int and 1 <= value <= MAX_HISTORY_LIMIT:
                return HistoryLimitChoice(value, "spec")
            problem = (
                f"{where} has spec.rollout.historyLimit {shorten(repr(value), 40)}, not a whole"
                f" number from 1 to {MAX_HISTORY_LIMIT}"
            )
    return HistoryLimitChoice(
        store_default,
        "store-default",
        f"{problem}; keeping the store's default history limit, {store_default} versions: pass"
        " --history-limit N to keep another number (or -n for the component's namespace)",
    )


def read_component(
    kube: Callable[[], Any], namespace: str, name: str, *, request_timeout: float | None = None
) -> dict[str, Any] | Unreadable:
    """The DefenderComponent as the API server serves it, or why it could not be read: the
    kubeconfig unusable, the API server not answering (within `request_timeout`, the flag's,
    named when it ran out), the resource absent or forbidden, its answer undecodable. `kube`
    opens the client (the Connection's), so a kubeconfig that does not load is one of those
    reasons, not the command's failure."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    try:
        api = CustomObjectsApi(kube())
        # Decoded here, not by the client, so that an undecodable answer is this function's
        # to word (the client's own decoding would raise from deep inside it).
        answer: Any = api.get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, _preload_content=False
        )
        try:
            raw = answer.data
        finally:
            answer.release_conn()
        obj = json.loads(raw)
    except CliError as exc:
        # The kubeconfig's problems, already worded without quoting the file.
        return Unreadable(str(exc))
    except ApiException as exc:
        return Unreadable(f"{exc.status} {exc.reason}")
    except RecursionError:
        return Unreadable(f"the API server's answer is {TOO_DEEP}")
    except ValueError:
        # Not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError).
        return Unreadable("the API server's answer is not JSON")
    except Exception as exc:
        unreachable = api_server_unreachable(exc, request_timeout)
        if unreachable is None:
            raise
        return Unreadable(f"the Kubernetes API server does not answer: {unreachable}")
    if not isinstance(obj, dict):
        return Unreadable("the API server's answer is not an object")
    return obj


def store_history_limit(client: DefenderClient) -> int:
    """What the library keeps when not told otherwise (the settings' `history_limit`)."""
    return ConfigStore(client).history_limit


def rollback_direct(
    client: DefenderClient, component: str, to: RollbackTarget, keep: HistoryLimitChoice
) -> dict[str, Any]:
    version = ConfigStore(client).rollback(component, to, by=who(), history_limit=keep.limit)
    return {
        "component": component,
        "rolledBackTo": format_rollback_target(to),
        "activeVersion": version,
        "historyLimit": keep.limit,
        "historyLimitFrom": keep.source,
        "via": "etcd",
    }


def _annotate_component(kube: Any, namespace: str, name: str, annotation: str, value: str) -> None:
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    body = {"metadata": {"annotations": {annotation: value}}}
    try:
        # The patched object the server answers with is not read: nothing here needs it, and
        # decoding it would fail on a spec.config nested deeper than Python's recursion limit
        # (a RecursionError after the annotation was set). A non-2xx is still an ApiException.
        response: Any = CustomObjectsApi(kube).patch_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, body, _preload_content=False
        )
        response.close()
    except ApiException as exc:
        raise CliError(
            f"cannot annotate defendercomponent {namespace}/{name}: {exc.status} {exc.reason};"
            " check the name, the namespace (-n) and that you may patch defendercomponents"
        ) from None


def annotate_rollback(kube: Any, namespace: str, name: str, to: RollbackTarget) -> dict[str, Any]:
    _annotate_component(kube, namespace, name, ROLLBACK_ANNOTATION, format_rollback_target(to))
    return {
        "component": name,
        "namespace": namespace,
        "rolledBackTo": format_rollback_target(to),
        "via": f"annotation {ROLLBACK_ANNOTATION}",
    }


def annotate_rollout(kube: Any, namespace: str, name: str, action: str) -> dict[str, Any]:
    """`promote` or `abort` the canary rollout of a DefenderComponent (the operator acts on the
    annotation once and removes it; without a rollout in progress it posts a Warning Event)."""
    annotation = {"promote": PROMOTE_ANNOTATION, "abort": ABORT_ANNOTATION}[action]
    requested = f"{datetime.now(UTC).isoformat()} by {who()}"
    _annotate_component(kube, namespace, name, annotation, requested)
    return {
        "component": name,
        "namespace": namespace,
        "rollout": action,
        "via": f"annotation {annotation}",
    }


def annotate_rotation(kube: Any, namespace: str, secret: str) -> dict[str, Any]:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    requested = f"{datetime.now(UTC).isoformat()} by {who()}"
    body = {"metadata": {"annotations": {ROTATE_ANNOTATION: requested}}}
    try:
        # The patched Secret is not read (as `_annotate_component`): the request is set once
        # the server answers 2xx, however deep someone nested the Secret's fields.
        answer: Any = CoreV1Api(kube).patch_namespaced_secret(
            secret, namespace, body, _preload_content=False
        )
        answer.close()
    except ApiException as exc:
        raise CliError(
            f"cannot annotate Secret {namespace}/{secret}: {exc.status} {exc.reason}; check"
            " --operator-namespace / --secret and that you may patch Secrets there"
        ) from None
    return {
        "secret": f"{namespace}/{secret}",
        "requested": requested,
        "annotation": ROTATE_ANNOTATION,
    }
