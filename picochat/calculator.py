"""The calculator tool: safe arithmetic for <|python_start|> ... <|python_end|> tool calls.

Model output is untrusted text, so it never reaches eval()/exec(). We parse it with `ast` and
walk only a whitelist: numbers, + - * / // % **, unary +/-, parentheses. Everything else
(names, calls, attribute access such as ().__class__, subscripts, strings, lambdas) is rejected.
Limits keep a hostile expression from eating the machine: input length, AST size, exponent
size, magnitude of every intermediate result, and a wall-clock deadline checked at every node.
"""
from __future__ import annotations

import ast
import math
import operator
import time

MAX_CHARS = 256
MAX_NODES = 128
MAX_EXPONENT = 64          # |b| in a ** b
MAX_MAGNITUDE = 1e30       # any intermediate result
DEFAULT_TIMEOUT = 0.05     # seconds

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not allowed, too big, too slow, or mathematically invalid."""


def _check(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    return value


def evaluate(expr: str, timeout: float = DEFAULT_TIMEOUT) -> int | float:
    """Evaluate an arithmetic expression; raise CalculatorError for anything else."""
    if not isinstance(expr, str):
        raise CalculatorError("expression must be a string")
    expr = expr.strip().replace(",", "")  # "1,234 * 2" is how people (and models) write numbers
    if not expr or len(expr) > MAX_CHARS:
        raise CalculatorError(f"expression must be 1..{MAX_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(f"not an arithmetic expression ({e.__class__.__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError("expression too long")
    deadline = time.monotonic() + timeout

    def walk(node):
        if time.monotonic() > deadline:
            raise CalculatorError("timed out")
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return _check(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check(_UNARY[type(node.op)](walk(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(right) > MAX_EXPONENT:
                    raise CalculatorError("exponent too large")
                if left == 0 and right < 0:
                    raise CalculatorError("division by zero")
            try:
                return _check(_BINOPS[type(node.op)](left, right))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("number too large") from None
        raise CalculatorError(f"{type(node).__name__} is not allowed")

    result = walk(tree)
    if isinstance(result, complex):
        raise CalculatorError("complex result")
    return result


def format_result(value: int | float) -> str:
    """Render like Python would, but without float noise: 6.0 -> 6, 0.1+0.2 -> 0.3."""
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def run_tool(expr: str) -> str:
    """What the model sees between <|output_start|> and <|output_end|>: a value or an error."""
    try:
        return format_result(evaluate(expr))
    except CalculatorError as e:
        return f"error: {e}"
