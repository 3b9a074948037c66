"""Per-parameter rules for Amos: regex assign maps and a restricted ``SHAPE`` expression evaluator.

An assign map is an ordered mapping ``regex -> value``. For a parameter named
``('encoder', 'blocks', '0', 'mlp', 'fc1', 'kernel')`` the name is joined with ``name_sep``
(``encoder/blocks/0/mlp/fc1/kernel``) and the value of the first regex that ``re.match``-es
it (anchored at the start, as in google-research/jestimator ``amos_helper.py``) is returned.

With ``eval_str_value=True`` string values are expressions of the parameter's shape
``SHAPE``, e.g. ``'sqrt(1 / SHAPE[0])'`` or ``'(1, SHAPE[1])'``. They are evaluated by a
small interpreter over Python's ``ast`` that allows only: numbers, the name ``SHAPE``,
indexing and slicing, tuples, unary ``+``/``-``, the binary operators ``+ - * / // % **``
and the functions ``sqrt`` and ``prod`` (the reference's README uses ``prod(SHAPE[:-1])``).
Anything else (attribute access, other names or calls, comprehensions, ...) is a
``ValueError``; Python's ``eval`` is never used.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flaxlab.optim.amos.transform import ParamsFn, Shape

_BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"sqrt": math.sqrt, "prod": math.prod}
# Bounds that keep a hostile expression from taking unbounded time or memory.
_MAX_EXPONENT = 64
_MAX_REPEAT = 1024
_MAX_EXPRESSION_LENGTH = 1000


def _check_number(value, node, expression):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"in {expression!r}: {ast.unparse(node)!r} is {value!r}; a number is needed here"
        )
    return value


def parse_shape_expression(expression: str) -> ast.expr:
    """Parses and checks a ``SHAPE`` expression; raises ``ValueError`` naming what is refused."""
    if not isinstance(expression, str):
        raise ValueError(f"a SHAPE expression must be a str, got {expression!r}")
    if len(expression) > _MAX_EXPRESSION_LENGTH:
        raise ValueError(f"SHAPE expression longer than {_MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"invalid SHAPE expression {expression!r}: {error.msg}") from None
    allowed = (
        ast.Expression,
        ast.Constant,
        ast.Name,
        ast.Load,
        ast.Subscript,
        ast.Slice,
        ast.Tuple,
        ast.UnaryOp,
        ast.BinOp,
        ast.Call,
        *_BINARY_OPERATORS,
        *_UNARY_OPERATORS,
    )
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise ValueError(
                f"SHAPE expression {expression!r} uses {type(node).__name__}, which is refused; "
                "accepted: numbers, SHAPE, indexing/slicing, tuples, + - * / // % **, "
                "sqrt(), prod()"
            )
        if isinstance(node, ast.Name) and node.id != "SHAPE" and node.id not in _FUNCTIONS:
            raise ValueError(
                f"SHAPE expression {expression!r} uses the name {node.id!r}; accepted: SHAPE "
                f"and the functions {sorted(_FUNCTIONS)}"
            )
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
                raise ValueError(
                    f"SHAPE expression {expression!r} calls {ast.unparse(node.func)!r}; "
                    f"accepted functions: {sorted(_FUNCTIONS)}"
                )
            if node.keywords:
                raise ValueError(f"SHAPE expression {expression!r}: keyword arguments refused")
        if isinstance(node, ast.Name) and node.id in _FUNCTIONS:
            continue
        if isinstance(node, ast.Constant) and (
            isinstance(node.value, bool) or not isinstance(node.value, int | float)
        ):
            raise ValueError(
                f"SHAPE expression {expression!r} has the constant {node.value!r}; "
                "only int and float constants are accepted"
            )
    # A function name is only valid as the callee of a call.
    callees = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in _FUNCTIONS and id(node) not in callees:
            raise ValueError(f"SHAPE expression {expression!r}: {node.id!r} must be called")
    return tree.body


def evaluate_shape_expression(expression: str, shape: Shape):
    """Evaluates ``expression`` with ``SHAPE = shape``.

    Example:
      >>> evaluate_shape_expression("sqrt(2 / SHAPE[-2])", (3072, 768))
      0.02551551815399144
      >>> evaluate_shape_expression("(1,) * 3 + (SHAPE[-1],)", (3, 3, 16, 32))
      (1, 1, 1, 32)
    """
    body = parse_shape_expression(expression)
    shape = tuple(int(s) for s in shape)

    def run(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):  # Only SHAPE reaches here (checked at parse time).
            return shape
        if isinstance(node, ast.Tuple):
            return tuple(run(element) for element in node.elts)
        if isinstance(node, ast.Slice):
            parts = (node.lower, node.upper, node.step)
            return slice(
                *(None if p is None else _check_number(run(p), p, expression) for p in parts)
            )
        if isinstance(node, ast.Subscript):
            return run(node.value)[run(node.slice)]
        if isinstance(node, ast.UnaryOp):
            operand = _check_number(run(node.operand), node.operand, expression)
            return _UNARY_OPERATORS[type(node.op)](operand)
        if isinstance(node, ast.BinOp):
            left, right = run(node.left), run(node.right)
            if (
                isinstance(node.op, ast.Pow)
                and abs(_check_number(right, node.right, expression)) > _MAX_EXPONENT
            ):
                raise ValueError(f"in {expression!r}: exponent {right!r} is above {_MAX_EXPONENT}")
            if isinstance(node.op, ast.Mult) and (
                isinstance(left, tuple) or isinstance(right, tuple)
            ):
                repeat = right if isinstance(left, tuple) else left
                if not isinstance(repeat, int) or abs(repeat) > _MAX_REPEAT:
                    raise ValueError(f"in {expression!r}: tuple repeat {repeat!r} refused")
            return _BINARY_OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)  # checked by parse_shape_expression
            return _FUNCTIONS[node.func.id](*(run(argument) for argument in node.args))
        raise ValueError(f"in {expression!r}: cannot evaluate {ast.unparse(node)!r}")

    try:
        return run(body)
    except ValueError:
        raise
    except (TypeError, IndexError, ZeroDivisionError, OverflowError, AttributeError) as error:
        raise ValueError(
            f"cannot evaluate SHAPE expression {expression!r} for SHAPE={shape}: {error}"
        ) from None


def params_fn_from_assign_map(
    assign_map: Mapping[str, Any], name_sep: str = "/", eval_str_value: bool = False
) -> ParamsFn:
    """Builds a ``(name, shape) -> value`` function (an ``eta_fn`` or ``shape_fn``) from rules.

    Args:
      assign_map: ordered mapping ``regex -> value``; the first regex that ``re.match``-es
        the joined name wins.
      name_sep: separator used to join the name's components before matching.
      eval_str_value: if True, string values are ``SHAPE`` expressions evaluated per parameter
        (see the module docstring); otherwise values are returned as they are.

    Returns:
      ``params_fn(name, shape)``; it raises ``ValueError`` naming the parameter when no rule
      matches.

    Example:
      >>> eta_fn = params_fn_from_assign_map(
      ...     {".*/bias": 0.5, ".*/kernel": "sqrt(1 / SHAPE[0])"}, eval_str_value=True)
      >>> eta_fn(("dense", "kernel"), (4, 8))
      0.5
    """
    if not isinstance(assign_map, Mapping):
        raise ValueError(f"assign_map must be a mapping regex -> value, got {assign_map!r}")
    rules = []
    for pattern, value in assign_map.items():
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"assign_map key {pattern!r} is not a valid regex: {error}") from None
        if eval_str_value and isinstance(value, str):
            parse_shape_expression(value)  # Refuse bad expressions now, not at first use.
        rules.append((pattern, regex, value))

    def params_fn(name: tuple[str, ...], shape: Shape):
        joined = name_sep.join(name)
        for pattern, regex, value in rules:
            if regex.match(joined):
                if eval_str_value and isinstance(value, str):
                    try:
                        return evaluate_shape_expression(value, shape)
                    except ValueError as error:
                        raise ValueError(
                            f"rule {pattern!r} for parameter {joined!r}: {error}"
                        ) from None
                return value
        raise ValueError(
            f"no rule matches parameter {joined!r} of shape {tuple(shape)}; patterns tried in "
            f"order: {[pattern for pattern, _, _ in rules]}; add a rule for it or a catch-all '.*'"
        )

    return params_fn


def load_rules_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-parameter Amos rules from a JSON or TOML file: ``(eta_overrides, shape_overrides)``.

    The file maps a name pattern (a regex, matched as by :func:`params_fn_from_assign_map`
    against the ``/``-joined parameter name) to a table with ``eta`` and/or ``shape``; values
    are numbers, lists (slot shapes) or ``SHAPE`` expressions, checked by the restricted
    evaluator when the file is read. Patterns keep the file's order; the defaults apply to
    parameters that no pattern matches.

    Example (``rules.toml``)::

        [".*head/kernel"]
        eta = 0.01
        [".*mlp/fc1/kernel"]
        eta = "sqrt(1 / SHAPE[0])"
        shape = "(1, SHAPE[-1])"

    Raises:
      ValueError: naming the file and the offending entry.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"optimizer.amos.rules={str(path)!r}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"expected a .json or .toml file, got suffix {file.suffix!r}")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"optimizer.amos.rules={str(path)!r} is not readable: {error}") from None
    if not isinstance(data, Mapping):
        raise ValueError(
            f"optimizer.amos.rules={str(path)!r} must map name patterns to tables of eta/shape"
        )
    eta, shape = {}, {}
    for pattern, rule in data.items():
        where = f"optimizer.amos.rules={str(path)!r}, pattern {pattern!r}"
        if not isinstance(rule, Mapping) or not rule or set(rule) - {"eta", "shape"}:
            raise ValueError(f"{where}: expected a table with 'eta' and/or 'shape', got {rule!r}")
        if "eta" in rule:
            eta[pattern] = _rule_value(rule["eta"], where + " eta")
        if "shape" in rule:
            value = rule["shape"]
            shape[pattern] = tuple(value) if isinstance(value, list) else value
            _rule_value(shape[pattern], where + " shape")
    try:  # patterns and expressions are checked now, not at the first parameter
        params_fn_from_assign_map(eta, eval_str_value=True)
        params_fn_from_assign_map(shape, eval_str_value=True)
    except ValueError as error:
        raise ValueError(f"optimizer.amos.rules={str(path)!r}: {error}") from None
    return eta, shape


def _rule_value(value, where: str):
    ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    ok = ok or (isinstance(value, tuple) and all(isinstance(v, int) for v in value))
    if not ok:
        raise ValueError(f"{where}: {value!r} is not a number, a list of ints or an expression")
    return value
