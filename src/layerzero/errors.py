"""Every error LayerZero raises derives from `LayerZeroError` and names what was wrong."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LayerZeroError(Exception):
    """Base class of all LayerZero errors."""


class InvalidInputError(LayerZeroError, ValueError):
    """A tensor or argument given to an op does not fit what the op expects.

    The message names the argument, the expected value and the actual one.
    """

    def __init__(self, argument: str, expected: str, got: object, hint: str = "") -> None:
        self.argument = argument
        self.expected = expected
        self.got = got
        msg = f"{argument}: expected {expected}, got {got}"
        super().__init__(f"{msg}; {hint}" if hint else msg)


class UnknownNameError(LayerZeroError, KeyError):
    """An unknown name (kernel id, backend, op, layout, platform, ...); lists the close matches.

    Names in a dotted family are suggested by their family too: "attention" suggests
    'attention.causal', 'attention.full', .... `where` prefixes the message (a file and line, an
    argument), `shown` follows it (the offending line of a file).
    """

    def __init__(self, kind: str, name: str, known: Iterable[str], *, where: str = "", shown: str = "") -> None:
        known = sorted(set(known))
        family = [k for k in known if k.startswith(f"{name}.")]
        close = family[:8] or difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        self.kind = kind
        self.name = name
        self.known = tuple(known)
        self.close_matches = close
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        super().__init__(f"{where}unknown {kind} {name!r}{hint} (known: {listing}){shown}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NoKernelFoundError(LayerZeroError):
    """No kernel can run the call and the policy forbids the fallback (strict mode)."""

    def __init__(self, message: str, report: object = None) -> None:
        self.report = report
        super().__init__(message if report is None else f"{message}\n{report}")


class KernelExecutionError(LayerZeroError, RuntimeError):
    """A kernel raised while running; carries the kernel id and the original error."""

    def __init__(self, kernel_id: str, error: BaseException) -> None:
        self.kernel_id = kernel_id
        self.error = error
        super().__init__(f"kernel {kernel_id} failed: {type(error).__name__}: {error}")


class CudaGraphUnsafeError(LayerZeroError):
    """A kernel that is not capture-safe was asked to run under CUDA graph capture."""


class PolicyValidationError(LayerZeroError, ValueError):
    """A policy (file, env or code) is invalid; says where and what."""


class UnknownPolicyNameError(UnknownNameError, PolicyValidationError):
    """An unknown op, backend or kernel in a policy (code, environment or file): an UnknownNameError
    like every unknown name, and a PolicyValidationError like every other problem of a policy."""


class BackendNotAvailableError(LayerZeroError):
    """A backend was required explicitly but is not installed or not usable here."""


class ConfigurationError(LayerZeroError, ValueError):
    """A configuration value is invalid."""


class SelectionTimeoutError(LayerZeroError, TimeoutError):
    """Waiting for another thread's selection of the same call took too long."""


class CacheCorruptionError(LayerZeroError):
    """A persisted cache (plans, PerfDB) is unreadable or inconsistent."""
