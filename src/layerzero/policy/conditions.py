"""The policy condition language: comparisons over SelectionContext fields, never `eval`.

    sm >= 80 and batch_size >= 8
    dtype in ["float16", "bfloat16"] and not is_causal
    64 <= head_dim <= 128 or layout == "BHSD"

Text is parsed with `ast` and every node is checked against a whitelist (boolean operators,
comparisons including chained ones, `in` / `not in`, constants and lists of constants, field
names), then compiled into closures. Names are the fields of SelectionContext and its
properties (`batch_size`, `seq_len`, `device`, `gqa_ratio`); `dtype` compares with names such
as "bfloat16" (also `torch.bfloat16`, `bf16`, `fp16`). Types are checked when the condition is
parsed, so a typo fails at load time rather than at the first call.
"""

from __future__ import annotations

import ast
import difflib
import functools
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from ..context import SelectionContext
from ..errors import PolicyValidationError
from ..kernel import dtype_name

Condition = Callable[[SelectionContext], bool]

MAX_CONDITION_LENGTH = 1000

# Value kinds of context fields; the type check of a comparison works on these.
_KIND_OF_ANNOTATION = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "str | None": "str",
    "torch.dtype": "dtype",
    "frozenset[str]": "set",
}
_NUMERIC = frozenset({"int", "float"})
_NAMED_CONSTANTS = {"true": True, "false": False, "none": None, "null": None}

_COMPARE: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda a, b: a in b),
    ast.NotIn: ("not in", lambda a, b: a not in b),
}
OPERATORS = tuple(symbol for symbol, _ in _COMPARE.values())


@functools.lru_cache(maxsize=1)
def field_kinds() -> Mapping[str, str]:
    """Every name a condition may use, with its value kind (int, float, bool, str, dtype, set, other)."""
    kinds = {f.name: _KIND_OF_ANNOTATION.get(str(f.type), "other") for f in fields(SelectionContext)}
    for name in dir(SelectionContext):
        attr = getattr(SelectionContext, name, None)
        if isinstance(attr, property) and not name.startswith("_") and attr.fget is not None:
            kinds[name] = _KIND_OF_ANNOTATION.get(str(attr.fget.__annotations__.get("return")), "other")
    kinds.pop("dtype_name", None)  # `dtype` already compares by name
    return kinds


class _Operand:
    """A parsed side of a comparison: a field (with its kind) or a constant."""

    __slots__ = ("field", "kind", "value", "node")

    def __init__(self, node: ast.AST, field: str | None, kind: str, value: Any = None) -> None:
        self.node, self.field, self.kind, self.value = node, field, kind, value

    def getter(self) -> Callable[[SelectionContext], Any]:
        if self.field is None:
            value = self.value
            return lambda ctx: value
        if self.field == "dtype":
            return lambda ctx: ctx.dtype_name
        return operator.attrgetter(self.field)


class _Compiler:
    def __init__(self, text: str) -> None:
        self.text = text
        self.kinds = field_kinds()

    def fail(self, node: ast.AST | None, message: str, hint: str = "") -> PolicyValidationError:
        where = f" at column {node.col_offset + 1}" if node is not None and hasattr(node, "col_offset") else ""
        return PolicyValidationError(f"condition {self.text!r}: {message}{where}{hint}")

    def unknown_field(self, node: ast.AST, name: str) -> PolicyValidationError:
        close = difflib.get_close_matches(name, list(self.kinds), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return self.fail(node, f"unknown field {name!r}", hint)

    # ---- expressions
    def expr(self, node: ast.AST) -> Condition:
        if isinstance(node, ast.BoolOp):
            parts = tuple(self.expr(v) for v in node.values)
            if isinstance(node.op, ast.And):
                return lambda ctx: all(p(ctx) for p in parts)
            return lambda ctx: any(p(ctx) for p in parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.expr(node.operand)
            return lambda ctx: not inner(ctx)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):
            if node.id in self.kinds:
                if self.kinds[node.id] != "bool":
                    raise self.fail(node, f"field {node.id!r} is not a bool; compare it, e.g. {node.id} > 0")
                return operator.attrgetter(node.id)
            if node.id.lower() in ("true", "false"):
                value = node.id.lower() == "true"
                return lambda ctx: value
            raise self.unknown_field(node, node.id)
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            value = node.value
            return lambda ctx: value
        raise self.fail(node, f"{self.describe(node)} is not a condition (use comparisons joined by and/or/not)")

    def compare(self, node: ast.Compare) -> Condition:
        operands = [node.left, *node.comparators]
        checks: list[Condition] = []
        for i, op in enumerate(node.ops):
            symbol_fn = _COMPARE.get(type(op))
            if symbol_fn is None:
                raise self.fail(node, f"operator {type(op).__name__} is not allowed (allowed: {', '.join(OPERATORS)})")
            checks.append(self.pair(operands[i], symbol_fn[0], symbol_fn[1], operands[i + 1]))
        if len(checks) == 1:
            return checks[0]
        return lambda ctx: all(c(ctx) for c in checks)

    def pair(self, left_node: ast.AST, symbol: str, fn: Callable[[Any, Any], bool], right_node: ast.AST) -> Condition:
        left = self.operand(left_node)
        right = self.operand(right_node)
        if left.field is None and right.field is None:
            for side in (left_node, right_node):
                if isinstance(side, ast.Name):
                    raise self.unknown_field(side, side.id)
            raise self.fail(left_node, f"'{symbol}' compares two constants; one side must be a context field")
        # A bare word next to a str or dtype field is a string: `layout == BSHD`, `dtype == bf16`.
        for this, other in ((left, right), (right, left)):
            if this.kind == "word":
                if other.kind in ("str", "dtype"):
                    this.kind, this.value = "str", this.value
                else:
                    raise self.unknown_field(this.node, this.value)
        self.check_types(left, symbol, right)
        get_left, get_right = left.getter(), right.getter()
        return lambda ctx: bool(fn(get_left(ctx), get_right(ctx)))

    def check_types(self, left: _Operand, symbol: str, right: _Operand) -> None:
        field, const = (left, right) if left.field is not None else (right, left)
        if symbol in ("in", "not in"):
            if right.kind == "set" and right.field is not None:  # "avx512f" in isa
                if left.kind != "str":
                    raise self.fail(left.node, f"'{symbol} {right.field}' needs a string on the left")
                return
            if left.field is None or right.kind != "list":
                raise self.fail(
                    right.node, f"'{symbol}' needs a field on the left and a list of constants on the right"
                )
            for item in right.value:
                self.check_value(left, symbol, item, right.node)
            if left.kind == "dtype":
                right.value = frozenset(dtype_name(v) for v in right.value)
            else:
                right.value = frozenset(right.value)
            return
        if const.kind == "list":
            raise self.fail(const.node, f"'{symbol}' compares with one value, not a list (use 'in' for lists)")
        if field.kind == "set" or (const.field is not None and const.kind == "set"):
            raise self.fail(field.node, f"field {field.field!r} is a set; use '\"value\" in {field.field}'")
        if symbol in ("<", "<=", ">", ">="):
            for side in (left, right):
                if side.kind not in _NUMERIC:
                    what = f"field {side.field!r}" if side.field else repr(side.value)
                    raise self.fail(side.node, f"'{symbol}' needs numbers; {what} is {side.kind}")
            return
        if const.field is not None:  # field == field
            if (field.kind in _NUMERIC) != (const.kind in _NUMERIC) or (
                field.kind not in _NUMERIC and field.kind != const.kind
            ):
                raise self.fail(
                    field.node, f"cannot compare {field.field!r} ({field.kind}) with {const.field!r} ({const.kind})"
                )
            return
        self.check_value(field, symbol, const.value, const.node)
        if field.kind == "dtype":
            const.value = dtype_name(const.value)

    def check_value(self, field: _Operand, symbol: str, value: Any, node: ast.AST) -> None:
        kind = field.kind
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str) or value is None,
            "dtype": isinstance(value, str),
            "other": True,
        }.get(kind, False)
        if not ok:
            raise self.fail(node, f"field {field.field!r} is {kind}, got {value!r} ({type(value).__name__})")
        if kind == "dtype" and dtype_name(value) is None:
            raise self.fail(node, f"unknown dtype {value!r} (use names like 'bfloat16', 'float16', 'float32')")

    def operand(self, node: ast.AST) -> _Operand:
        if isinstance(node, ast.Name):
            if node.id in self.kinds:
                return _Operand(node, node.id, self.kinds[node.id])
            if node.id.lower() in _NAMED_CONSTANTS:
                value = _NAMED_CONSTANTS[node.id.lower()]
                return _Operand(node, None, "bool" if isinstance(value, bool) else "none", value)
            return _Operand(node, None, "word", node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            return _Operand(node, None, "str", f"torch.{node.attr}")  # torch.bfloat16
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = []
            for elt in node.elts:
                item = self.operand(elt)
                if item.field is not None or item.kind in ("list", "word"):
                    if item.kind == "word":
                        items.append(item.value)
                        continue
                    raise self.fail(elt, f"list items must be constants, got {self.describe(elt)}")
                items.append(item.value)
            return _Operand(node, None, "list", items)
        value = self.constant(node)
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), "none")
        return _Operand(node, None, kind, value)

    def constant(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = node.operand
            number = isinstance(inner, ast.Constant) and type(inner.value) in (int, float)
            if number:
                return -inner.value if isinstance(node.op, ast.USub) else inner.value
        raise self.fail(node, f"{self.describe(node)} is not allowed here (use a field, a number, a string or a list)")

    def describe(self, node: ast.AST) -> str:
        try:
            return repr(ast.unparse(node))
        except Exception:  # noqa: BLE001 - only for the message
            return type(node).__name__


def parse_condition(text: str) -> Condition:
    """Compile a condition into a function of a SelectionContext; PolicyValidationError if invalid."""
    if not isinstance(text, str):
        raise PolicyValidationError(f"condition: expected a string, got {text!r} ({type(text).__name__})")
    if not text.strip():
        raise PolicyValidationError("condition: expected an expression, got an empty string")
    if len(text) > MAX_CONDITION_LENGTH:
        raise PolicyValidationError(f"condition: expected at most {MAX_CONDITION_LENGTH} characters, got {len(text)}")
    compiler = _Compiler(text)
    try:
        with warnings.catch_warnings():  # "1abc" warns before it fails; the error below says it all
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        column = f" at column {exc.offset}" if exc.offset else ""
        raise PolicyValidationError(f"condition {text!r}: invalid syntax ({exc.msg}){column}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise PolicyValidationError(f"condition {text!r}: cannot be parsed ({type(exc).__name__})") from None
    try:
        return compiler.expr(tree.body)
    except RecursionError:
        raise PolicyValidationError(f"condition {text!r}: nested too deeply") from None


_WHEN_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")


def when_to_text(when: Mapping[str, Any]) -> str:
    """The condition text of a `when:` mapping: {head_dim: ">=64", dtype: bfloat16, num_heads: [32, 64]}.

    A string value may start with a comparison operator; a list means `in`; any other value `==`.
    """
    parts = []
    for name, value in when.items():
        if not isinstance(name, str):
            raise PolicyValidationError(f"when: field names must be strings, got {name!r}")
        if isinstance(value, (list, tuple)):
            parts.append(f"{name} in {list(value)!r}")
            continue
        if isinstance(value, str):
            stripped = value.strip()
            symbol = next((s for s in _WHEN_OPERATORS if stripped.startswith(s)), None)
            if symbol is not None:
                rest = stripped[len(symbol) :].strip()
                parts.append(f"{name} {symbol} {_literal_text(rest)}")
                continue
            if stripped.startswith(("in ", "not in ")):
                parts.append(f"{name} {stripped}")
                continue
        parts.append(f"{name} == {value!r}")
    return " and ".join(parts)


def _literal_text(rest: str) -> str:
    """`64` stays a number, `bfloat16` becomes a quoted string."""
    try:
        value = ast.literal_eval(rest)
    except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
        return repr(rest)
    return repr(value) if isinstance(value, (int, float, str, bool)) or value is None else repr(rest)
