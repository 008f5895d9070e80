"""What the validating webhook refuses: the operator's own checks, run at admission time.

One validation, two moments: `review` calls the same `_api.parse_spec` and
`defender_config.validate_config` that `_reconcile` runs later, so `kubectl apply` is refused
for exactly what the operator would otherwise report as ConfigInvalid or SpecRefused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from defender_config import (
    ConfigValidationError,
    InvalidRollbackTargetError,
    brief_listing,
    parse_rollback_target,
    validate_config,
)
from defender_operator import _api


def _spec_problems(exc: ValidationError) -> list[str]:
    problems = []
    for e in exc.errors(include_url=False, include_input=False):
        path = ".".join(["spec", *(str(p) for p in e["loc"])])
        message = str(e["msg"]).removeprefix("Value error, ")
        problems.append(f"{path}: {message}")
    return problems


def review(
    name: str,
    spec: Mapping[str, Any],
    old_spec: Mapping[str, Any] | None,
    annotations: Mapping[str, str],
) -> list[str]:
    """Every problem of this object as `field.path: reason`; empty when it may be stored.

    `old_spec` is the stored spec on an update (None on create). An update that leaves the spec
    as it is passes whatever the spec holds: the operator's own metadata writes (finalizers,
    removing a command annotation) must never be blocked by a spec stored while this webhook
    was down, which the operator reports in its conditions instead.
    """
    problems = _rollback_problems(annotations)
    if old_spec is not None and dict(spec) == dict(old_spec):
        return problems
    try:
        parsed = _api.parse_spec(dict(spec))
    except ValidationError as exc:
        return problems + _spec_problems(exc)
    try:
        validate_config(
            parsed.component_type.value, parsed.config, parsed.custom_schema, component=name
        )
    except ConfigValidationError as exc:
        problems += [
            f"spec.config{'.' + e.location if e.location else ''}: {e.message}" for e in exc.errors
        ]
    return problems


def _rollback_problems(annotations: Mapping[str, str]) -> list[str]:
    target = annotations.get(_api.ROLLBACK_ANNOTATION)
    if target is None:
        return []
    try:
        parse_rollback_target(target)
    except InvalidRollbackTargetError as exc:
        return [f"metadata.annotations[{_api.ROLLBACK_ANNOTATION}]: {exc}"]
    return []


# Each problem is cut to this many characters: enough for the longest one this module words
# itself, a rollback target's (the target quoted to 32 characters, the versions to use, where
# to list them), whose hint the listing's default of 160 cut off mid-word. A config problem
# that quotes a long value is still cut.
PROBLEM_CHARS = 320


def refusal(name: str, problems: list[str]) -> str:
    """The one message `kubectl` prints for a refused object."""
    n = len(problems)
    listed = brief_listing(problems, chars=PROBLEM_CHARS)
    return f"{name} refused ({n} problem{'s' if n != 1 else ''}): " + listed
