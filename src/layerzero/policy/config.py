"""The code API of policy: configure, lock, prefer, disabled, watch_policy, and the env layer.

Every change builds new immutable layers, merges them and swaps the runtime's policy, which
bumps the plan-cache generation: no call that starts after the change returns gets a plan of
the old policy. Calls are process-wide; `prefer`, `lock`, `disabled` and `enabled` used as `with`
blocks change the choice of the thread or task running the block only (policy.model.Scope).
"""

from __future__ import annotations

import dis
import functools
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

from ..errors import ConfigurationError, PolicyValidationError
from ..selection.engine import REFERENCE_BACKEND
from ..state import runtime
from .conditions import parse_condition
from .loader import (
    DEFAULT_PREFER_PRIORITY,
    ENV_VARS,
    check_kernel_op,
    check_operation,
    check_target_op,
    environment_policy,
    load_policy_file,
    parse_policy_mapping,
    parse_policy_text,
    resolve_target,
)
from .model import LAYERS, Policy, Rule

log = logging.getLogger("layerzero")

PathLike = str | os.PathLike[str]


# ---- installing layers


def _update_layer(layer: str, change: Any) -> Policy:
    """Apply `change(policy) -> policy` to one layer atomically; returns the merged policy."""
    runtime.ensure_loaded()
    with runtime._lock:
        layers = runtime.policy_layers
        runtime.set_layers(replace(layers, **{layer: change(getattr(layers, layer))}))
        return runtime.policy


# ---- configure / load_config / get_config


def configure(
    source: PathLike | Mapping[str, Any] | None = None,
    *,
    strict_mode: bool | None = None,
    lock: Mapping[str, str] | None = None,
    allow: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
    deny: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
    prefer: Mapping[str, float] | None = None,
    plan_cache_size: int | None = None,
    plan_cache_ttl_s: float | None = None,
    watch: bool = False,
    interval_s: float = 1.0,
) -> dict[str, Any]:
    """Configure selection; returns `get_config()`.

    source: a policy file path (becomes the file source; `watch=True` hot-reloads it) or a
    mapping in the file schema (replaces the code source's rules). Keywords change the code
    source: `lock={"attention.causal": "torch.sdpa_flash"}`, `allow=["torch", "reference"]` or
    `{op_pattern: [targets]}`, `deny=` the same, `prefer={"torch": 90}`, `strict_mode=True`.
    `plan_cache_size` / `plan_cache_ttl_s` size the plan cache (TTL None = no expiry).
    """
    runtime.ensure_loaded()
    if isinstance(source, Mapping):
        code = parse_policy_mapping(source, runtime.registry)
        _update_layer("code", lambda _: code)
    elif source is not None:
        if watch:
            watch_policy(source, interval_s)
        else:
            _set_file(load_policy_file(source, runtime.registry), os.fspath(source))
    elif watch:
        raise ConfigurationError("configure: watch=True needs a policy file path as `source`")
    for op, target in (lock or {}).items():
        _Lock(op, target)
    for kind, spec in (("allow", allow), ("deny", deny)):
        if spec is None:
            continue
        items = spec.items() if isinstance(spec, Mapping) else [("*", spec)]
        rules = []
        for op, targets in items:
            for target in [targets] if isinstance(targets, str) else targets:
                rules.append(_code_rule(kind, op, target))
        field = kind + "s" if kind == "allow" else "denies"
        _update_layer("code", lambda p, f=field, r=tuple(rules): replace(p, **{f: getattr(p, f) + r}))
    for target, priority in (prefer or {}).items():
        _Prefer(target, priority)
    if strict_mode is not None:
        if not isinstance(strict_mode, bool):
            raise ConfigurationError(f"strict_mode: expected True or False, got {strict_mode!r}")
        _update_layer("code", lambda p: replace(p, strict=strict_mode))
    if plan_cache_size is not None or plan_cache_ttl_s is not None:
        runtime.plans.configure(
            maxsize=plan_cache_size,
            ttl_s=plan_cache_ttl_s if plan_cache_ttl_s is not None else runtime.plans.ttl_s,
        )
    return get_config()


def load_config(path: PathLike | None = None) -> dict[str, Any]:
    """Re-read the environment and the policy file; returns `get_config()`.

    The file is `path`, else LAYERZERO_POLICY, else the file read last. Nothing changes unless
    every source is valid (PolicyValidationError otherwise).
    """
    runtime.ensure_loaded()
    with runtime._lock:
        env_policy = environment_policy(os.environ, runtime.registry)
        file_path = (
            os.fspath(path)
            if path is not None
            else (os.environ.get("LAYERZERO_POLICY") or runtime.policy_layers.file_path)
        )
        file_policy = load_policy_file(file_path, runtime.registry) if file_path else None
        runtime.set_layers(replace(runtime.policy_layers, env=env_policy))
        if file_policy is not None:
            _set_file(file_policy, file_path)
    return get_config()


def _set_file(policy: Policy, path: str) -> None:
    """Install the file source; a watcher of another file stops (it would overwrite this one)."""
    with runtime._lock:
        watcher = runtime.policy_watcher
        runtime.set_layers(replace(runtime.policy_layers, file=policy, file_path=path))
    if watcher is not None and os.path.abspath(watcher.path) != os.path.abspath(path):
        watcher.stop()


def get_config() -> dict[str, Any]:
    """The policy in force (rules in precedence order, each with its source), the plan cache
    settings, disabled backends and where the configuration came from."""
    runtime.ensure_loaded()
    policy, layers = runtime.policy, runtime.policy_layers
    watcher = runtime.policy_watcher
    return {
        "version": "1.0",
        "strict_mode": bool(policy.strict),
        "regime": policy.regime,  # None: each call's own (graph under capture / compile, else eager)
        "locks": [r.to_dict() for r in policy.locks],
        "allows": [r.to_dict() for r in policy.allows],
        "denies": [r.to_dict() for r in policy.denies],
        "boosts": [r.to_dict() for r in policy.boosts],
        "prefer": [r.to_dict() for r in policy.prefers],
        "disabled_backends": sorted(runtime.disabled_backends),
        "plan_cache": {"size": runtime.plans.maxsize, "ttl_s": runtime.plans.ttl_s},
        "sources": {
            "precedence": list(LAYERS),
            "file": layers.file_path,
            "watching": watcher.path if watcher is not None and watcher.running else None,
            "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        },
    }


# ---- statements and blocks


def _entered_by_with(depth: int) -> bool:
    """Whether the call `depth` frames up constructs the policy object as the subject of a `with`
    statement (`with lz.prefer(...):`): the instruction after the call enters it. Read when the object
    is made, before __enter__, so that a block never changes the process-wide policy, not even for
    the instant between the two."""
    frame = sys._getframe(depth + 1)
    return _enters_with(frame.f_code, frame.f_lasti)


@functools.lru_cache(maxsize=512)
def _enters_with(code: types.CodeType, lasti: int) -> bool:
    after = [i.opname for i in dis.get_instructions(code) if i.offset > lasti][:2]
    if after[:1] in (["BEFORE_WITH"], ["SETUP_WITH"]):  # CPython 3.11-3.13, 3.10
        return True
    return after == ["COPY", "LOAD_SPECIAL"]  # CPython 3.14: `with` loads __exit__ and __enter__ itself


class _Override:
    """A policy change that takes effect for every thread at once and stays (a statement: `lz.prefer(...)`,
    `.undo()` takes it back), or, made as the subject of a `with` statement, holds for that block in
    the thread or task that runs it and nowhere else (a ContextVar, policy.model.SCOPE), undone on exit
    also when the block raises. An object made first and entered later acts process-wide for its block."""

    _block: tuple[Any, Any] | None = None

    def _begin(self, scoped: bool | None = None) -> None:
        """Take effect: process-wide now, or for the block the caller is about to enter."""
        self._scoped = _entered_by_with(2) if scoped is None else scoped  # _begin <- __init__ <- its caller
        if not self._scoped:
            self._apply()

    def _change(self, code: Policy, disabled: frozenset[str]) -> tuple[Policy, frozenset[str]]:
        """The change to (code layer, disabled set), as a block applies it on top of the process-wide ones."""
        raise NotImplementedError

    def _apply(self) -> None:
        raise NotImplementedError

    def undo(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        if self._scoped:
            self._block = runtime.enter_scope(self._change)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._block is not None:
            runtime.leave_scope(*self._block)
            self._block = None
        elif not self._scoped:
            self.undo()


def _code_rule(kind: str, op: str, target: str, condition: str | None = None, **extra: Any) -> Rule:
    if not isinstance(op, str):
        raise PolicyValidationError(f"operation: expected an op id or pattern like 'attention.*', got {op!r}")
    if not isinstance(target, str):
        raise PolicyValidationError(f"{kind} target: expected a backend name or kernel id, got {target!r}")
    check_operation(runtime.registry, op)
    backends, kernels = resolve_target(runtime.registry, target)
    fn = parse_condition(condition) if condition else None
    return Rule(kind, op, backends, kernels, fn, condition or "", source="code", layer="code", **extra)


class lock(_Override):  # noqa: N801 - used like a function: lz.lock(op, kernel) or `with lz.lock(op, kernel):`
    """Run `operation` (an op id or glob) with `kernel` (a kernel id, backend name or group) whenever it can.

    Replaces an earlier code lock of the same op (`.undo()` brings it back). If the kernel cannot run
    a call, LayerZero warns once and selects among the rest, or raises NoKernelFoundError in strict
    mode. A statement for every thread; a `with` block for that block in its thread or task only.
    """

    def __init__(self, operation: str, kernel: str, condition: str | None = None) -> None:
        runtime.ensure_loaded()
        self.rule = rule = _code_rule("lock", operation, kernel, condition)
        if len(rule.kernels) == 1:
            check_kernel_op(runtime.registry, rule.kernels[0], operation)
        elif rule.kernels:  # a group (torch_sdpa)
            check_target_op(runtime.registry, rule.kernels, operation, kernel)
        self.replaced: tuple[Rule, ...] = ()
        self._begin()

    def _change(self, code: Policy, disabled: frozenset[str]) -> tuple[Policy, frozenset[str]]:
        op = self.rule.operation
        return replace(code, locks=(self.rule, *(r for r in code.locks if r.operation != op))), disabled

    def _apply(self) -> None:
        def change(p: Policy) -> Policy:
            self.replaced = tuple(r for r in p.locks if r.operation == self.rule.operation)
            return self._change(p, frozenset())[0]

        _update_layer("code", change)

    def undo(self) -> None:
        """Remove this lock, restoring the code locks of the same op it replaced."""
        if self._scoped:
            return  # a block's lock ends with its block
        replaced, self.replaced = self.replaced, ()
        _update_layer(
            "code",
            lambda p: replace(p, locks=tuple(x for r in p.locks for x in ((r,) if r is not self.rule else replaced))),
        )

    def __repr__(self) -> str:
        return f"<lock {self.rule.describe()}>"


def unlock(operation: str) -> bool:
    """Remove the locks on exactly `operation` from every source (until that source is read again).

    Returns whether a lock was removed.
    """
    op = operation
    runtime.ensure_loaded()
    with runtime._lock:
        layers = runtime.policy_layers
        changed = {}
        for name in LAYERS:
            policy = getattr(layers, name)
            kept = tuple(r for r in policy.locks if r.operation != op)
            if len(kept) != len(policy.locks):
                changed[name] = replace(policy, locks=kept)
        if changed:
            runtime.set_layers(replace(layers, **changed))
        return bool(changed)


def get_locks() -> dict[str, str]:
    """{op pattern: target} of the locks in force, the winning one per pattern (see get_config
    for their conditions and sources)."""
    runtime.ensure_loaded()
    out: dict[str, str] = {}
    for rule in runtime.policy.locks:
        out.setdefault(rule.operation, rule.target)
    return out


# ---- prefer, disabled, enabled


class prefer(_Override):  # noqa: N801 - used like a function: lz.prefer("torch") or `with lz.prefer("torch"):`
    """Give the kernels of `target` (a backend, kernel id or group) the priority `priority` for `op`
    (an op id or glob; also `operation=`).

    Takes effect at once for every thread and stays (a setting; `.undo()` takes it back); as a `with`
    block it holds for that block in its thread or task only, also when the block raises. The
    default priority (1000) is above every built-in one.
    """

    def __init__(
        self,
        target: str,
        priority: float = DEFAULT_PREFER_PRIORITY,
        *,
        op: str = "*",
        condition: str | None = None,
        operation: str | None = None,
    ) -> None:
        runtime.ensure_loaded()
        if operation is not None:  # the spec's name for op
            if op != "*" and op != operation:
                raise PolicyValidationError(f"prefer: give op or operation, not both (got {op!r} and {operation!r})")
            op = operation
        if isinstance(priority, bool) or not isinstance(priority, (int, float)) or priority != priority:
            raise PolicyValidationError(f"prefer: priority: expected a number, got {priority!r}")
        self.rule = _code_rule("prefer", op, target, condition, priority=float(priority))
        self.replaced: Rule | None = None
        self._begin()

    def _same(self, rule: Rule) -> bool:
        return (rule.operation, rule.backends, rule.kernels, rule.condition_text) == (
            self.rule.operation,
            self.rule.backends,
            self.rule.kernels,
            self.rule.condition_text,
        )

    def _change(self, code: Policy, disabled: frozenset[str]) -> tuple[Policy, frozenset[str]]:
        return replace(code, prefers=(self.rule, *(r for r in code.prefers if not self._same(r)))), disabled

    def _apply(self) -> None:
        def change(p: Policy) -> Policy:
            same = [r for r in p.prefers if self._same(r)]
            self.replaced = same[0] if same else None
            return self._change(p, frozenset())[0]

        _update_layer("code", change)

    def undo(self) -> None:
        """Remove this preference, restoring the one it replaced."""
        if self._scoped:
            return  # a block's preference ends with its block
        restored = (self.replaced,) if self.replaced is not None else ()
        _update_layer(
            "code",
            lambda p: replace(
                p, prefers=tuple(x for r in p.prefers for x in ((r,) if r is not self.rule else restored))
            ),
        )

    def __repr__(self) -> str:
        return f"<prefer {self.rule.describe()}>"


_Prefer = prefer  # `configure(prefer=...)` shadows the name
_Lock = lock  # `configure(lock=...)` too


def _switch_targets(call: str, targets: tuple[str, ...]) -> frozenset[str]:
    """Backend names and kernel ids for lz.disabled / lz.enabled (a group such as torch_sdpa gives its kernels)."""
    names: set[str] = set()
    for name in targets:
        if not isinstance(name, str):
            raise ConfigurationError(f"{call}: expected backend names or kernel ids, got {name!r}")
        group = runtime.registry.group(name)
        if "." in name or group is not None:
            backends, kernels = resolve_target(runtime.registry, name)
        else:
            backends, kernels = (runtime.registry.backend_name(name),), ()
        if REFERENCE_BACKEND in backends or any(
            runtime.registry.kernel(k).backend == REFERENCE_BACKEND for k in kernels
        ):
            raise ConfigurationError(f"{call}: the reference backend cannot be disabled (a call always runs)")
        names.update(backends + kernels)
    return frozenset(names)


class disabled(_Override):  # noqa: N801 - used like a function: lz.disabled("xformers") or `with lz.disabled(...):`
    """Skip backends, kernel ids or groups (`torch_sdpa`: torch's SDPA kernels) in selection.

    Takes effect at once for every thread and stays (a setting, like `prefer`) until `.undo()` or
    `lz.enabled(...)`; as `with lz.disabled("flashinfer", "xformers"):` it holds for that block in its
    thread or task only, also when the block raises. With no arguments, every backend but the torch
    reference is skipped (reference-only mode). The reference cannot be disabled: a call always runs.
    """

    def __init__(self, *targets: str) -> None:
        runtime.ensure_loaded()
        self.names = _switch_targets("disabled", targets) if targets else frozenset({"*"})
        self.targets = targets
        self.added: frozenset[str] = frozenset()  # what undo() takes back
        self._begin()

    def _change(self, code: Policy, disabled: frozenset[str]) -> tuple[Policy, frozenset[str]]:
        return code, disabled | self.names

    def _apply(self) -> None:
        with runtime._lock:
            self.added = self.names - runtime.process_disabled
            runtime.disabled_backends = runtime.process_disabled | self.added

    def undo(self) -> None:
        """Enable again what this call disabled (not what was disabled before it)."""
        with runtime._lock:
            runtime.disabled_backends = runtime.process_disabled - self.added
            self.added = frozenset()

    def __repr__(self) -> str:
        return f"<disabled {', '.join(self.targets) or '*'}>"


class enabled(_Override):  # noqa: N801 - used like a function: lz.enabled("torch_sdpa") or `with lz.enabled(...):`
    """Re-enable what `lz.disabled` switched off: backends, kernel ids or groups; with no arguments,
    everything. `.undo()` disables them again; a `with` block re-enables them for that block in its
    thread or task only.

    Enabling a backend also enables its kernels disabled one by one. A kernel or backend that is
    disabled only through a wider entry (its backend, or `lz.disabled()` with no arguments) cannot
    be enabled alone: ConfigurationError names the entry to enable instead.
    """

    def __init__(self, *targets: str) -> None:
        runtime.ensure_loaded()
        names = _switch_targets("enabled", targets)
        scoped = _entered_by_with(1)
        current = runtime.disabled_backends if scoped else runtime.process_disabled
        if not targets:
            removed = set(current)
        elif "*" in current:
            raise ConfigurationError(
                f"enabled: {targets[0]!r} is disabled through lz.disabled() (every "
                "backend); call lz.enabled() (or undo that call) instead"
            )
        else:
            removed = {n for n in names if n in current}
            for name in names - removed:
                kernel = runtime.registry.kernels.get(name)
                if kernel is None:  # a backend: its kernels disabled one by one too
                    removed.update(
                        k
                        for k in current
                        if k in runtime.registry.kernels and runtime.registry.kernels[k].backend == name
                    )
                elif kernel.backend in current:
                    raise ConfigurationError(
                        f"enabled: {name!r} is disabled through lz.disabled("
                        f"{kernel.backend!r}); call lz.enabled({kernel.backend!r}) "
                        "(or undo that call) instead"
                    )
        self.removed = frozenset(removed)
        self._begin(scoped)

    def _change(self, code: Policy, disabled: frozenset[str]) -> tuple[Policy, frozenset[str]]:
        return code, disabled - self.removed

    def _apply(self) -> None:
        with runtime._lock:
            runtime.disabled_backends = runtime.process_disabled - self.removed

    def undo(self) -> None:
        """Disable again what this call enabled."""
        with runtime._lock:
            runtime.disabled_backends = runtime.process_disabled | self.removed
            self.removed = frozenset()


# ---- hot reload


class PolicyWatcher:
    """Polls a policy file and swaps the file source when its content changes.

    An invalid new version is logged (an error, once per version) and the old policy stays.
    `check()` polls once now (tests call it to avoid sleeping); `stop()` ends the thread.
    """

    def __init__(self, path: PathLike, interval_s: float, parse: Callable[[bytes, str], Policy] | None = None) -> None:
        self.path = os.fspath(path)
        self.interval_s = interval_s
        self._parse = parse or _parse_file_bytes  # the file's format: the policy schema unless told
        self.reloads = 0
        self.errors = 0
        self.last_error: str | None = None
        self._seen: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="layerzero-policy-watch", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def load_now(self) -> None:
        """Load the file and install it; raises PolicyValidationError if it is invalid."""
        content = self._read()
        policy = self._parse(content, self.path)
        self._install(policy, content)

    def check(self) -> bool:
        """Poll once: True when a new valid version was installed."""
        try:
            content = self._read()
        except PolicyValidationError as exc:
            content, error = None, str(exc)
        else:
            if content == self._seen:
                return False
            try:
                policy = self._parse(content, self.path)
                error = None
            except PolicyValidationError as exc:
                error = str(exc)
        if error is not None:
            if content != self._seen or self.last_error != error:
                self.errors += 1
                self.last_error = error
                log.error("policy %s not reloaded, the previous policy stays in force: %s", self.path, error)
            self._seen = content
            return False
        return self._install(policy, content)

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise PolicyValidationError(f"{self.path}: cannot read the policy file: {exc.strerror or exc}") from None

    def _install(self, policy: Policy, content: bytes) -> bool:
        with runtime._lock:
            if self._stop.is_set():
                return False
            runtime.set_layers(replace(runtime.policy_layers, file=policy, file_path=self.path))
            self._seen = content
            self.reloads += 1
            self.last_error = None
        log.info("policy %s loaded (%d rules)", self.path, len(policy.rules()))
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must keep running
                log.exception("policy watcher for %s failed to poll", self.path)

    def start(self) -> PolicyWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if runtime.policy_watcher is self:
            runtime.policy_watcher = None

    def __enter__(self) -> PolicyWatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _parse_file_bytes(content: bytes, path: str) -> Policy:

    return parse_policy_text(content, runtime.registry, source=path)


def watch_policy(
    path: PathLike, interval_s: float = 1.0, *, parse: Callable[[bytes, str], Policy] | None = None
) -> PolicyWatcher:
    """Load `path` now (raising if invalid), then poll it every `interval_s` and swap the policy
    atomically when it changes. Replaces an earlier watcher; `.stop()` or `with` ends it.
    parse: (content, path) -> Policy for another file format (layerzero.dispatch's config)."""
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
        raise ConfigurationError(f"interval_s: expected a number of seconds > 0, got {interval_s!r}")
    runtime.ensure_loaded()
    watcher = PolicyWatcher(path, float(interval_s), parse)
    watcher.load_now()
    with runtime._lock:
        previous, runtime.policy_watcher = runtime.policy_watcher, watcher
    if previous is not None:
        previous.stop()
    return watcher.start()


__all__ = [
    "PolicyWatcher",
    "configure",
    "disabled",
    "enabled",
    "get_config",
    "get_locks",
    "load_config",
    "lock",
    "prefer",
    "unlock",
    "watch_policy",
]
