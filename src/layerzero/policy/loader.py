"""Policy sources: YAML files (with file:line error reports), mappings, and LAYERZERO_* variables.

Every loader validates everything against the kernel registry and raises
PolicyValidationError naming the file, the line and the offending text; nothing is applied
unless the whole source is valid. The file schema (all keys optional):

    version: "1.0"
    strict_mode: false                      # or `strict`
    locks:   [{operation: attention.causal, kernel: torch.sdpa_flash, condition: "sm >= 80"}]
    allows:  [{operation: "attention.*", backends: [flashinfer, flash_attn]}]
    denies:  [{operation: "attention.*", backends: [torch_sdpa], when: {batch_size: ">1"}}]
    boosts:  [{operation: "attention.*", backend: flashinfer, boost_factor: 2.0}]
    prefer:  [{backend: torch, priority: 90}]
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import PolicyValidationError, UnknownNameError, UnknownPolicyNameError
from ..perf.perfdb import REGIMES
from .conditions import parse_condition, when_to_text
from .model import Policy, Rule

if TYPE_CHECKING:
    from ..backends import Registry

SUPPORTED_VERSIONS = ("1", "1.0")
DEFAULT_PREFER_PRIORITY = 1000.0  # above every built-in kernel priority (0-100)
MAX_POLICY_BYTES = 1 << 20

SECTIONS = {"locks": "lock", "allows": "allow", "denies": "deny", "boosts": "boost", "prefer": "prefer"}
TOP_LEVEL_KEYS = ("version", "strict_mode", "strict", *SECTIONS)
_TARGET_KEYS = ("backend", "backends", "kernel", "kernels")
_RULE_KEYS = {
    "lock": ("operation", "backend", "kernel", "condition", "when"),
    "allow": ("operation", *_TARGET_KEYS, "condition", "when"),
    "deny": ("operation", *_TARGET_KEYS, "condition", "when"),
    "boost": ("operation", *_TARGET_KEYS, "boost_factor", "condition", "when"),
    "prefer": ("operation", *_TARGET_KEYS, "priority", "condition", "when"),
}
ENV_VARS = (
    "LAYERZERO_POLICY",
    "LAYERZERO_LOCK",
    "LAYERZERO_DENY",
    "LAYERZERO_ALLOW",
    "LAYERZERO_PREFER",
    "LAYERZERO_STRICT",
    "LAYERZERO_REGIME",
)


class _Located(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class _LocatedList(list):  # type: ignore[type-arg]
    line: int = 0
    item_lines: list[int]


class _Source:
    """Where values come from, to turn a problem into `file:line: message` plus the line's text."""

    def __init__(self, name: str, text: str | None = None) -> None:
        self.name = name
        self.lines = text.splitlines() if text is not None else []

    def error(self, line: int, where: str, message: str | UnknownNameError) -> PolicyValidationError:
        """The error of `message` at `line`; an unknown name stays an UnknownNameError."""
        loc = f"{self.name}:{line}" if line else self.name
        text = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        shown = f"\n    {line} | {text}" if text else ""
        prefix = f"{loc}: {where}: " if where else f"{loc}: "
        if isinstance(message, UnknownNameError):
            err: PolicyValidationError = UnknownPolicyNameError(
                message.kind, message.name, message.known, where=prefix, shown=shown
            )
        else:
            err = PolicyValidationError(f"{prefix}{message}{shown}")
        err.source, err.line, err.text = self.name, line, text  # type: ignore[attr-defined]
        return err


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    """A safe YAML loader (libyaml's when available) whose mappings and lists remember lines."""
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        pass

    def mapping(loader: Any, node: Any) -> _Located:
        loader.flatten_mapping(node)
        out = _Located()
        out.line, out.key_lines = node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                raise _Problem(line, f"a mapping key must be a string, got {type(key).__name__}") from None
            if key in out:
                raise _Problem(line, f"duplicate key {key!r}")
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = line
        return out

    def sequence(loader: Any, node: Any) -> _LocatedList:
        out = _LocatedList(loader.construct_object(child, deep=True) for child in node.value)
        out.line, out.item_lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


class _Problem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _load_yaml(text: str | bytes, source: str) -> tuple[_Source, Any]:
    """The YAML document of a policy or dispatch config, with line numbers kept (see _yaml_loader);
    every problem is a PolicyValidationError naming the source and line: undecodable bytes, a document
    over MAX_POLICY_BYTES, invalid YAML, or one that exhausts the parser."""
    import yaml

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"expected UTF-8 text, got undecodable bytes at offset {exc.start}"
            raise _Source(source).error(0, "", message) from None
    src = _Source(source, text)
    if len(text) > MAX_POLICY_BYTES:
        raise src.error(0, "", f"expected at most {MAX_POLICY_BYTES} bytes, got {len(text)}")
    try:
        return src, yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except _Problem as exc:
        raise src.error(exc.line, "", exc.message) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise src.error(line, "", f"not valid YAML: {problem}") from None
    except (RecursionError, MemoryError, ValueError, OverflowError, TypeError) as exc:
        raise src.error(0, "", f"not valid YAML: {type(exc).__name__}") from None


def parse_policy_text(text: str | bytes, registry: Registry, source: str = "<policy>", layer: str = "file") -> Policy:
    """Parse and validate a YAML policy document."""
    src, document = _load_yaml(text, source)
    if document is None:
        return Policy()
    return _Validator(src, registry, layer).document(document)


def load_policy_file(path: str | os.PathLike[str], registry: Registry, layer: str = "file") -> Policy:
    """Read, parse and validate a policy file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyValidationError(f"{name}: cannot read the policy file: {exc.strerror or exc}") from None
    return parse_policy_text(data, registry, source=name, layer=layer)


def parse_policy_mapping(
    document: Mapping[str, Any], registry: Registry, source: str = "configure()", layer: str = "code"
) -> Policy:
    """Validate a policy given as a Python mapping in the file schema (no line numbers)."""
    return _Validator(_Source(source), registry, layer).document(document)


class _Validator:
    def __init__(self, src: _Source, registry: Registry, layer: str) -> None:
        self.src, self.registry, self.layer = src, registry, layer

    def fail(self, line: int, where: str, message: str | UnknownNameError) -> PolicyValidationError:
        return self.src.error(line, where, message)

    @staticmethod
    def line_of(mapping: Any, key: Any) -> int:
        if isinstance(mapping, _Located):
            return mapping.key_lines.get(key, mapping.line)
        return 0

    def document(self, doc: Any) -> Policy:
        if not isinstance(doc, Mapping):
            raise self.fail(
                getattr(doc, "line", 1 if self.src.lines else 0),
                "",
                f"expected a mapping of {', '.join(TOP_LEVEL_KEYS)}, got {type(doc).__name__}",
            )
        for key in doc:
            if key not in TOP_LEVEL_KEYS:
                raise self.fail(
                    self.line_of(doc, key),
                    "",
                    f"unknown top-level key {key!r}{_hint(key, TOP_LEVEL_KEYS)} (known: {', '.join(TOP_LEVEL_KEYS)})",
                )
        if "version" in doc:
            version = doc["version"]
            if isinstance(version, bool) or str(version) not in SUPPORTED_VERSIONS:
                raise self.fail(
                    self.line_of(doc, "version"), "version", f'unsupported version {version!r} (supported: "1.0")'
                )
        strict = None
        if "strict" in doc and "strict_mode" in doc:
            raise self.fail(self.line_of(doc, "strict"), "strict", "give strict or strict_mode, not both")
        for key in ("strict", "strict_mode"):
            if key in doc:
                strict = doc[key]
                if not isinstance(strict, bool):
                    raise self.fail(self.line_of(doc, key), key, f"expected true or false, got {strict!r}")
        sections: dict[str, list[Rule]] = {kind: [] for kind in SECTIONS.values()}
        for section, kind in SECTIONS.items():
            if section not in doc or doc[section] is None:
                continue
            entries = doc[section]
            if not isinstance(entries, list):
                raise self.fail(
                    self.line_of(doc, section), section, f"expected a list of rules, got {type(entries).__name__}"
                )
            for i, entry in enumerate(entries):
                line = entries.item_lines[i] if isinstance(entries, _LocatedList) else 0
                sections[kind].append(self.rule(kind, f"{section}[{i}]", entry, line))
        return Policy(
            locks=tuple(sections["lock"]),
            allows=tuple(sections["allow"]),
            denies=tuple(sections["deny"]),
            boosts=tuple(sections["boost"]),
            prefers=tuple(sections["prefer"]),
            strict=strict,
        )

    def rule(self, kind: str, where: str, entry: Any, line: int) -> Rule:
        if not isinstance(entry, Mapping):
            raise self.fail(
                line,
                where,
                f"expected a mapping with keys {', '.join(_RULE_KEYS[kind])}, got {type(entry).__name__} {entry!r}",
            )
        allowed = _RULE_KEYS[kind]
        for key in entry:
            if key not in allowed:
                raise self.fail(
                    self.line_of(entry, key),
                    where,
                    f"unknown key {key!r}{_hint(key, allowed)} (allowed in {kind} rules: {', '.join(allowed)})",
                )
        line = getattr(entry, "line", line)
        source = f"{self.src.name}:{line}" if line else self.src.name

        def at(key: str) -> tuple[int, str]:
            return self.line_of(entry, key), f"{where}.{key}"

        operation = entry.get("operation", "*")
        if not isinstance(operation, str):
            raise self.fail(*at("operation"), f"expected an operation id or pattern, got {operation!r}")
        try:
            check_operation(self.registry, operation)
        except UnknownNameError as exc:
            raise self.fail(*at("operation"), exc) from None

        backends: list[str] = []
        kernels: list[str] = []
        named = 0
        for key in _TARGET_KEYS:
            if key not in entry:
                continue
            values = entry[key]
            if key.endswith("s"):
                if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                    raise self.fail(*at(key), f"expected a non-empty list of names, got {values!r}")
            elif not isinstance(values, str):
                raise self.fail(*at(key), f"expected a name, got {values!r}")
            for value in values if isinstance(values, list) else [values]:
                named += 1
                try:
                    group = self.registry.group(value) if key.startswith("backend") else None
                    if group is not None:  # torch_sdpa: torch's SDPA kernels
                        kernels.extend(group)
                        check_target_op(self.registry, group, operation, value)
                    elif key.startswith("backend"):
                        backends.append(self.registry.backend_name(value))
                    else:
                        kernels.append(resolve_kernel(self.registry, value))
                        check_kernel_op(self.registry, kernels[-1], operation)
                except UnknownNameError as exc:
                    raise self.fail(*at(key), exc) from None
                except PolicyValidationError as exc:
                    raise self.fail(*at(key), str(exc)) from None
        if not named:
            keys = ", ".join(k for k in _TARGET_KEYS if k in allowed)
            raise self.fail(line, where, f"a {kind} rule needs a target: one of {keys}")
        if kind == "lock" and named != 1:
            raise self.fail(line, where, "a lock names exactly one target: backend or kernel, not both")

        condition_text = ""
        if "condition" in entry and "when" in entry:
            raise self.fail(*at("when"), "give condition or when, not both")
        if "condition" in entry:
            condition_text = entry["condition"]
            if not isinstance(condition_text, str):
                raise self.fail(*at("condition"), f"expected a condition string, got {condition_text!r}")
        elif "when" in entry:
            when = entry["when"]
            if not isinstance(when, Mapping) or not when:
                raise self.fail(*at("when"), f"expected a mapping of field: value, got {when!r}")
            try:
                condition_text = when_to_text(when)
            except PolicyValidationError as exc:
                raise self.fail(*at("when"), str(exc)) from None
        condition = None
        if condition_text:
            try:
                condition = parse_condition(condition_text)
            except PolicyValidationError as exc:
                raise self.fail(*at("condition" if "condition" in entry else "when"), str(exc)) from None

        extra: dict[str, float] = {}
        if kind == "boost":
            if "boost_factor" not in entry:
                raise self.fail(line, where, "a boost rule needs boost_factor (a number > 0)")
            extra["boost_factor"] = self.number(entry["boost_factor"], *at("boost_factor"), positive=True)
        if kind == "prefer":
            extra["priority"] = (
                self.number(entry["priority"], *at("priority")) if "priority" in entry else DEFAULT_PREFER_PRIORITY
            )
        return Rule(
            kind,
            operation,
            tuple(backends),
            tuple(kernels),
            condition,
            condition_text,
            source=source,
            layer=self.layer,
            **extra,
        )

    def number(self, value: Any, line: int, where: str, positive: bool = False) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or value in (float("inf"), float("-inf"))
        ):
            raise self.fail(line, where, f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(line, where, f"expected a number > 0, got {value!r}")
        return float(value)


def _hint(name: Any, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_operation(registry: Registry, operation: str) -> None:
    """UnknownPolicyNameError (a PolicyValidationError) unless `operation` (an op id or glob) names a
    registered op."""
    known = registry.by_op
    if operation == "*" or any(fnmatch.fnmatchcase(op, operation) for op in known):
        return
    raise UnknownPolicyNameError("operation", operation, known)


def check_kernel_op(registry: Registry, kernel_id: str, operation: str) -> None:
    """PolicyValidationError unless the kernel implements an op matching `operation`."""
    spec = registry.kernels[kernel_id]
    if operation != "*" and not any(fnmatch.fnmatchcase(op, operation) for op in spec.ops):
        raise PolicyValidationError(
            f"kernel {kernel_id!r} does not implement {operation!r} (it implements {', '.join(spec.ops)})"
        )


def resolve_kernel(registry: Registry, name: str) -> str:
    """A kernel id, with backend aliases accepted in its first part (`torch_sdpa.sdpa_math`)."""
    if name in registry.kernels:
        return name
    backend, _, rest = name.partition(".")
    if rest and backend in registry.aliases:
        candidate = f"{registry.aliases[backend]}.{rest}"
        if candidate in registry.kernels:
            return candidate
    raise UnknownPolicyNameError("kernel", name, registry.kernels)


def check_target_op(registry: Registry, kernel_ids: tuple[str, ...], operation: str, name: str) -> None:
    """PolicyValidationError unless one of the kernels a name stands for (a group) implements `operation`."""
    ops = sorted({op for k in kernel_ids for op in registry.kernels[k].ops})
    if operation != "*" and not any(fnmatch.fnmatchcase(op, operation) for op in ops):
        raise PolicyValidationError(
            f"{name!r} ({', '.join(kernel_ids)}) does not implement {operation!r} (it implements {', '.join(ops)})"
        )


def resolve_target(registry: Registry, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(backends, kernels) for a name that is a kernel id, a group (`torch_sdpa`: torch's SDPA kernels),
    or a backend name or alias."""
    if "." in name:
        return (), (resolve_kernel(registry, name),)
    group = registry.group(name)
    if group is not None:
        return (), group
    try:
        return (registry.backend_name(name),), ()
    except UnknownNameError:
        raise UnknownPolicyNameError(
            "backend or kernel", name, list(registry.backends) + list(registry.kernels)
        ) from None


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise PolicyValidationError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {value!r}")


def parse_regime(name: str, value: str) -> str | None:
    """A timing regime name ("eager" or "graph"; empty: unset), or PolicyValidationError naming `name`."""
    lowered = value.strip().lower()
    if not lowered:
        return None
    if lowered not in REGIMES:
        raise PolicyValidationError(f"{name}: expected one of {', '.join(REGIMES)}, got {value!r}")
    return lowered


def environment_policy(environ: Mapping[str, str], registry: Registry) -> Policy:
    """The env layer: LAYERZERO_LOCK (`op=kernel,...`), LAYERZERO_DENY / LAYERZERO_ALLOW
    (`[op=]backend_or_kernel,...`), LAYERZERO_PREFER (`[op=]backend_or_kernel[:priority],...`),
    LAYERZERO_STRICT (1/0) and LAYERZERO_REGIME (eager/graph: which PerfDB figure scores kernels,
    whatever the call's own regime). LAYERZERO_POLICY (a file) is read by the caller."""
    rules: dict[str, list[Rule]] = {"lock": [], "allow": [], "deny": [], "prefer": []}
    for var, kind in (
        ("LAYERZERO_LOCK", "lock"),
        ("LAYERZERO_ALLOW", "allow"),
        ("LAYERZERO_DENY", "deny"),
        ("LAYERZERO_PREFER", "prefer"),
    ):
        value = environ.get(var, "")
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            operation, eq, target = entry.rpartition("=")
            if not eq:
                if kind == "lock":
                    raise PolicyValidationError(
                        f"{var}: entry {entry!r}: expected op=kernel (e.g. attention.causal=torch.sdpa_math)"
                    )
                operation = "*"
            operation = operation.strip() or "*"
            target = target.strip()
            priority = DEFAULT_PREFER_PRIORITY
            if kind == "prefer" and ":" in target:
                target, _, number = target.rpartition(":")
                try:
                    priority = float(number)
                except ValueError:
                    raise PolicyValidationError(
                        f"{var}: entry {entry!r}: expected a number after ':', got {number!r}"
                    ) from None
            try:
                check_operation(registry, operation)
                backends, kernels = resolve_target(registry, target)
            except UnknownNameError as exc:
                raise UnknownPolicyNameError(exc.kind, exc.name, exc.known, where=f"{var}: entry {entry!r}: ") from None
            rules[kind].append(Rule(kind, operation, backends, kernels, priority=priority, source=var, layer="env"))
    strict = parse_bool("LAYERZERO_STRICT", environ["LAYERZERO_STRICT"]) if "LAYERZERO_STRICT" in environ else None
    regime = parse_regime("LAYERZERO_REGIME", environ.get("LAYERZERO_REGIME", ""))
    return Policy(
        locks=tuple(rules["lock"]),
        allows=tuple(rules["allow"]),
        denies=tuple(rules["deny"]),
        prefers=tuple(rules["prefer"]),
        strict=strict,
        regime=regime,
    )


# ---- the dispatch config format (layerzero.dispatch): ordered rules, each a lock

DISPATCH_OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
_DISPATCH_RULE_KEYS = ("operation", "conditions", "kernel", "backend")
_CONDITION_KEYS = ("field", "operator", "value")


def parse_dispatch_text(
    text: str | bytes, registry: Registry, source: str = "<dispatch config>", layer: str = "file"
) -> Policy:
    """Parse a dispatch config (the spec's dispatch_config.yaml) into a Policy of locks.

        version: "1.0"
        rules:
          - operation: "attention.*"
            conditions: [{field: batch_size, operator: ">", value: 32}]
            kernel: flashinfer.prefill          # a kernel id, a backend or a group (torch_sdpa)
          - operation: "attention.*"
            kernel: flash_attn                  # no conditions: the default

    Each rule is a lock whose condition is its conditions joined with `and`; locks apply in order,
    so the first rule whose operation and conditions match a call decides. The policy sections
    (locks, allows, denies, boosts, prefer, strict_mode) may stand beside `rules`; their locks come first.
    """
    src, document = _load_yaml(text, source)
    if not isinstance(document, Mapping):
        raise src.error(1, "", f"expected a mapping with version and rules, got {type(document).__name__}")
    validator = _Validator(src, registry, layer)
    rules = document.get("rules")
    rest = _Located({k: v for k, v in document.items() if k != "rules"})
    rest.line, rest.key_lines = getattr(document, "line", 0), getattr(document, "key_lines", {})
    policy = validator.document(rest)
    if rules is None:
        return policy
    if not isinstance(rules, list):
        raise src.error(validator.line_of(document, "rules"), "rules", f"expected a list of rules, got {rules!r}")
    locks = []
    for i, entry in enumerate(rules):
        where = f"rules[{i}]"
        line = rules.item_lines[i] if isinstance(rules, _LocatedList) else 0
        if not isinstance(entry, Mapping):
            raise src.error(
                line, where, f"expected a mapping with keys {', '.join(_DISPATCH_RULE_KEYS)}, got {entry!r}"
            )
        for key in entry:
            if key not in _DISPATCH_RULE_KEYS:
                raise src.error(
                    validator.line_of(entry, key),
                    where,
                    f"unknown key {key!r}{_hint(key, _DISPATCH_RULE_KEYS)} (allowed: {', '.join(_DISPATCH_RULE_KEYS)})",
                )
        lock = _Located({k: entry[k] for k in ("operation", "kernel", "backend") if k in entry})
        lock.line = getattr(entry, "line", line)
        lock.key_lines = dict(getattr(entry, "key_lines", {}))
        if "kernel" in lock and "." not in str(lock["kernel"]):  # `kernel: flash_attn` names a backend
            lock["backend"] = lock.pop("kernel")
            lock.key_lines["backend"] = lock.key_lines.get("kernel", lock.line)
        if "conditions" in entry:
            lock["condition"] = _conditions_text(src, validator, entry, where)
            lock.key_lines["condition"] = validator.line_of(entry, "conditions")
        locks.append(validator.rule("lock", where, lock, lock.line))
    return replace(policy, locks=policy.locks + tuple(locks))


def _conditions_text(src: _Source, validator: _Validator, entry: Any, where: str) -> str:
    conditions = entry["conditions"]
    line = validator.line_of(entry, "conditions")
    if not isinstance(conditions, list) or not conditions:
        raise src.error(
            line, f"{where}.conditions", f"expected a non-empty list of {{field, operator, value}}, got {conditions!r}"
        )
    parts = []
    for j, cond in enumerate(conditions):
        at = f"{where}.conditions[{j}]"
        cline = conditions.item_lines[j] if isinstance(conditions, _LocatedList) else line
        if not isinstance(cond, Mapping) or set(cond) != set(_CONDITION_KEYS):
            raise src.error(cline, at, f"expected a mapping with exactly field, operator and value, got {cond!r}")
        field, op, value = cond["field"], cond["operator"], cond["value"]
        if not isinstance(field, str) or not field.isidentifier():
            raise src.error(cline, at, f"field: expected a context field name such as batch_size, got {field!r}")
        if op not in DISPATCH_OPERATORS:
            raise src.error(cline, at, f"operator: expected one of {', '.join(DISPATCH_OPERATORS)}, got {op!r}")
        if op in ("in", "not in") and not isinstance(value, list):
            raise src.error(cline, at, f"value: expected a list for {op!r}, got {value!r}")
        parts.append(f"{field} {op} {value!r}")
    return " and ".join(parts)
