"""Normalising and comparing MATH answers, without a computer algebra system.

`normalize` follows `_strip_string` of the MATH release (hendrycks/math, math_equivalence.py)
with a few additions in the spirit of the PRM800K grader (openai/prm800k, grading/grader.py):
unwrapping `\\text{...}`, dropping unit words, thousands separators.

`is_equiv(prediction, gold)` is True when
1. the normalised strings are equal, or
2. both are numbers (integers, decimals, `\\frac`, `a/b`, `\\sqrt`, `\\pi`, mixed numbers like
   `2\\frac{1}{2}`, products and sums of those) and are equal: exactly for rationals (so 0.5 equals
   1/2 but 0.33 does not equal 1/3), to a relative 1e-9 when sqrt or pi make them irrational, or
3. both are tuples/intervals with the same brackets whose entries are pairwise equivalent.
Anything else (expressions with variables, matrices, sets) must match as a normalised string.
Numbers are evaluated by a tiny arithmetic interpreter over Python's `ast`, never by eval().
"""

import ast
import math
import re
from fractions import Fraction

UNITS = (r"(?:square\s+)?(?:units?|cm|centimeters?|meters?|km|kilometers?|inches|inch|feet|foot|ft|miles?|"
         r"yards?|degrees?|dollars?|cents?|seconds?|minutes?|hours?|days?|weeks?|months?|years?|pounds?|"
         r"ounces?|mph|sq)")


def normalize(answer):
    s = answer.strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    for old, new in [("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""), ("\\right", ""),
                     ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""),
                     ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("{,}", ",")]:
        s = s.replace(old, new)
    # "19 \text{ and }43" and "7, -2, \text{ and } -5" list answers: the word is a comma.
    s = re.sub(r",?\s*\\text\{\s*and\s*\}\s*", ",", s)
    # Units: Hendrycks cuts at a spaced "\text{ " ("5\text{ cm}" -> "5"); we cut only a tail that holds
    # no digit, so "5 \text{ or } 6" keeps its second number and is not read as 5.
    tail = re.search(r"\\text\{ |(?<=\d)[\s\\,;]*\\text\{[^{}\d]*\}$", s)
    if tail and not re.search(r"\d", s[tail.start():]):
        s = s[:tail.start()]
    s = re.sub(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(\d)\s*" + UNITS + r"(?:\^\{?[23]\}?)?\.?$", r"\1", s)   # "12 inches" -> "12"
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:      # "x = 5" -> "5"
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)                         # \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\(?:,|;|:|quad|qquad) ?", "", s).replace("~", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)                  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):                 # 10,000 -> 10000
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)                               # 3/4 -> \frac{3}{4}
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = s.rstrip(".")
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)                              # (C) -> C
    return m.group(1) if m else s


# --- numbers ------------------------------------------------------------------------------------

def _braced(s, i):
    """(content, index after) of the brace group starting at s[i] == "{", or None."""
    if i >= len(s) or s[i] != "{":
        return None
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
    return None


def to_python(s):
    """Translates a normalised LaTeX number into a Python arithmetic expression, or None."""
    out = ""
    i = 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num = _braced(s, i + 5)
            den = num and _braced(s, num[1])
            if not den:
                return None
            a, b = to_python(num[0]), to_python(den[0])
            if a is None or b is None:
                return None
            frac = f"(({a})/({b}))"
            whole = re.search(r"\d+$", out)
            if whole and num[0].isdigit() and den[0].isdigit() and not out[:whole.start()].endswith("."):
                # a mixed number: 2\frac{1}{2} means 2 + 1/2 (other products, like 2\frac{\pi}{3}, multiply)
                out, frac = out[:whole.start()], f"({whole.group()}+{frac})"
            out, i = out + frac, den[1]
        elif s.startswith("\\sqrt", i):
            arg = _braced(s, i + 5)
            inner = arg and to_python(arg[0])
            if not inner:
                return None
            out, i = out + f"sqrt({inner})", arg[1]
        elif s.startswith("\\pi", i):
            out, i = out + "(pi)", i + 3
        elif s.startswith("\\cdot", i) or s.startswith("\\times", i):
            out, i = out + "*", i + (5 if s.startswith("\\cdot", i) else 6)
        elif s[i] in "0123456789.+-*/()^{}":
            out, i = out + {"^": "**", "{": "(", "}": ")"}.get(s[i], s[i]), i + 1
        else:
            return None
    return re.sub(r"(?<=[\d)])(?=[(a-z])", "*", out)                  # implicit product: 2(pi), 3sqrt(2)


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _eval(node):
    """Evaluates an arithmetic syntax tree. Rational arithmetic stays exact (Fraction); sqrt, pi
    and fractional powers give floats."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value))        # "0.1" -> 1/10 exactly
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" \
            and len(node.args) == 1 and not node.keywords:
        return math.sqrt(_eval(node.args[0]))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exp = _eval(node.left), _eval(node.right)
        if abs(exp) > 64 or abs(base) > 1e6:                         # keep the arithmetic cheap
            raise ValueError("power too large")
        if isinstance(exp, Fraction) and exp.denominator == 1:
            return base ** int(exp)
        return float(base) ** float(exp)
    raise ValueError(f"not a number: {ast.dump(node)}")


def to_number(s):
    """The value of a normalised LaTeX number (a Fraction when exact, else a float), or None."""
    expr = to_python(s)
    if not expr:
        return None
    try:
        value = _eval(ast.parse(expr, mode="eval").body)
        if isinstance(value, Fraction) or (isinstance(value, float) and math.isfinite(value)):
            return value
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        pass
    return None


def numbers_equal(x, y):
    """Exact for two rationals; otherwise to a relative 1e-9 (floats carry about 1e-16)."""
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    try:
        return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12)
    except OverflowError:
        return False


# --- comparison ---------------------------------------------------------------------------------

def split_tuple(s):
    """("()", ["1", "2"]) for "(1,2)"; brackets "" for a bare list "1,2"; None for a single item."""
    brackets, inner = "", s
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        brackets, inner = s[0] + s[-1], s[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth < 0:
            return None                  # "(1)+(2)": the outer brackets do not enclose everything
        if ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return (brackets, parts) if len(parts) > 1 else None


def is_equiv(prediction, gold):
    """Whether a predicted MATH answer equals the gold answer (see the module docstring)."""
    if prediction is None or gold is None:
        return False
    a, b = normalize(prediction), normalize(gold)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return numbers_equal(x, y)
    ta, tb = split_tuple(a), split_tuple(b)
    if ta and tb and ta[0] == tb[0] and len(ta[1]) == len(tb[1]):
        return all(is_equiv(u, v) for u, v in zip(ta[1], tb[1]))
    return False
