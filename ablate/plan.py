"""Layer plans of grown and pruned variants: pure Python, no torch.

A :class:`Plan` is data: for a base with ``n`` decoder layers, the base layer each layer of
the result copies, and how that copy starts: an exact copy, or a *zero-output* copy whose
attention output projection and MLP down projection are zero, so the block adds nothing to the
residual stream at initialisation (the grown model computes exactly the base's function).

An :class:`Operator` is a named family with its parameters, written the same way in a study
YAML, on the command line and in Python (:func:`parse_plan` reads the text)::

    solar(8)   stack(2)   llama_pro(8)   mid(10, 6, 2)   similar(4)   prune(4, by=angular)

and :meth:`Operator.plan` turns it into the plan for a base of ``n`` layers. The families:

- ``solar(m)``: SOLAR's Depth Up-Scaling (Kim et al. 2023, arXiv 2312.15166). Two copies of the
  base, the last ``m`` layers of the first and the first ``m`` of the second dropped: result layer
  ``j`` copies base layer ``j`` for ``j < n - m`` and base layer ``j - (n - 2m)`` after that, so the
  result has ``s = 2 (n - m)`` layers. ``m = n/2`` is the base (the control), ``m = 0`` stacks the
  whole model twice and ``m > n/2`` prunes the middle.
- ``stack(g)``: ``g`` copies of the whole model on top of each other, G_stack's depthwise
  operator (Du et al. 2024, "Stacking Your Transformers", arXiv 2405.15319). ``stack(2)`` is
  ``solar(0)``, ``stack(1)`` the base.
- ``llama_pro(p)``: LLaMA Pro's block expansion (Wu et al. 2024, arXiv 2401.02415): the base's
  blocks in ``p`` groups of ``n/p``, each group followed by a zero-output copy of its last block
  (``n + p`` layers); LLaMA Pro then trains only the new blocks (``train.trainable: new``).
- ``mid(start, width, copies)``: the block of ``width`` layers from ``start`` appears ``copies``
  times in place, as in middle-block stacking (MIDAS, Saunshi et al. 2024, arXiv 2409.19044) and the
  Open-LLM-Leaderboard "RYS" (repeat your self) models; ``n + width (copies - 1)`` layers.
- ``similar(m)``: SOLAR's shape and depth, ``2 (n - m)`` layers, but the ``2m`` dropped layers
  split between the two copies where measured redundancy says: the ``n - 2m`` duplicated layers
  are the window whose per-layer angular distances (Gromov et al. 2024, arXiv 2403.17887, on
  held-out text: ``ablate.redundancy``) sum to the least, the layers that turn the residual stream
  least (ties go to SOLAR's middle). ``similar(m)`` is ``solar(m)`` when the middle wins.
- ``prune(k, by=...)``: remove ``k`` layers. ``by=angular``: Gromov et al.'s rule, the block of
  ``k`` consecutive layers from ``l*`` where ``l*`` minimises the angular distance between the
  hidden state entering layer ``l`` and the one entering layer ``l + k`` at each row's final
  token; ``by=influence``: ShortGPT's (Men et al. 2024, arXiv 2403.03853), the ``k`` layers of
  least block influence ``1 - cos(x_l, x_{l+1})``; ``by=last``: the last ``k`` layers.

``similar`` and ``prune(by=angular | influence)`` need measurements of the base. This module
never measures: :meth:`Operator.needs` says what a plan needs, as ``(kind, k)`` pairs, and
:meth:`Operator.plan` takes the numbers (``ablate.redundancy.measure`` computes them):

- ``("angular", 1)``: ``n`` values, layer ``l``'s mean angular distance ``arccos(cos)/pi`` between its
  input and output over every held-out token;
- ``("gromov", k)``: ``n - k + 1`` values, Gromov et al.'s ``d(x^l, x^(l+k))`` at each row's final
  token, averaged over rows (``x^n`` is the last layer's output, before the final norm);
- ``("influence", 1)``: ``n`` values, ShortGPT's block influence ``1 - cos`` over every token.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ablate.errors import UserError

__all__ = [
    "Plan", "Operator", "PlanError", "parse_plan", "resolve_plan", "FAMILIES", "PRUNE_BY",
    "solar", "stack", "llama_pro", "mid", "similar", "prune",
    "layer_plan", "upscaled_depth", "mergekit_slices",
]

Need = tuple[str, int]  # a measurement a plan needs: ("angular", 1), ("gromov", k) or ("influence", 1)
Measured = Mapping[Need, Sequence[float]]

# family -> its parameters in order; every parameter is a non-negative integer except prune's ``by``.
FAMILIES: dict[str, tuple[str, ...]] = {
    "solar": ("m",),
    "stack": ("g",),
    "llama_pro": ("p",),
    "mid": ("start", "width", "copies"),
    "similar": ("m",),
    "prune": ("k", "by"),
}
PRUNE_BY = ("angular", "influence", "last")
SPELLINGS = ("solar(m), stack(g), llama_pro(p), mid(start, width, copies), similar(m), "
             "prune(k, by=angular|influence|last)")


class PlanError(UserError, ValueError):
    """A plan that cannot be built: a user error (one line, exit code 2) and a ValueError for callers
    that check values (``layer_plan`` always raised ValueError)."""


@dataclass(frozen=True)
class Plan:
    """The layers of a variant of an ``n``-layer base: ``sources[j]`` is the base layer result layer
    ``j`` copies, ``zero[j]`` whether it starts as a zero-output copy. ``name`` is the operator's
    spelling (``"llama_pro(8)"``) where it came from one."""

    n: int
    sources: tuple[int, ...]
    zero: tuple[bool, ...]
    name: str = ""

    def __post_init__(self):
        if not _is_int(self.n) or self.n < 1:
            raise PlanError(f"a plan's base needs at least one layer, got n={self.n!r}")
        bad = [i for i in self.sources if not _is_int(i) or not 0 <= i < self.n]
        if bad:
            raise PlanError(f"plan {self.label}: base layer {bad[0]!r} does not exist in a model of n={self.n} "
                            f"layers (0..{self.n - 1})")
        if not self.sources:
            raise PlanError(f"plan {self.label} leaves no layer; a model needs at least one")
        if len(self.zero) != len(self.sources):
            raise PlanError(f"plan {self.label}: {len(self.zero)} init flags for {len(self.sources)} layers")

    @classmethod
    def of(cls, n: int, sources: Sequence[int], zero: Sequence[int] = (), name: str = "") -> Plan:
        """A plan from base-layer indices and the positions of its zero-output layers."""
        zero_at = set(zero)
        return cls(n, tuple(sources), tuple(j in zero_at for j in range(len(sources))), name)

    @property
    def label(self) -> str:
        return self.name or f"{list(self.sources)}"

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def zero_layers(self) -> list[int]:
        """Positions of the zero-output layers."""
        return [j for j, z in enumerate(self.zero) if z]

    @property
    def new_layers(self) -> list[int]:
        """Positions of the layers the operator added: a zero-output layer, or a later copy of a base
        layer already in the stack (the first copy of each base layer is the old one). What
        ``train.trainable: new`` trains, as LLaMA Pro trains only its inserted blocks."""
        seen: set[int] = set()
        out = []
        for j, (i, z) in enumerate(zip(self.sources, self.zero, strict=True)):
            if z or i in seen:
                out.append(j)
            seen.add(i)
        return out

    @property
    def is_base(self) -> bool:
        """True when the plan is the base model itself, every layer once, in order, as exact copies."""
        return self.sources == tuple(range(self.n)) and not any(self.zero)

    def slices(self) -> list[tuple[int, int, bool]]:
        """The plan as runs of consecutive base layers with one init, ``(start, end, zero)`` half-open:
        mergekit ``passthrough`` slices."""
        runs: list[list] = []
        for i, z in zip(self.sources, self.zero, strict=True):
            if runs and runs[-1][1] == i and runs[-1][2] == z:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, z])
        return [(a, b, z) for a, b, z in runs]

    def to_dict(self) -> dict:
        """The plan as a record (JSON): the operator, n, the depth, the sources and the zero-output layers."""
        return {"operator": self.name, "n": self.n, "s": len(self), "plan": list(self.sources),
                "zero_output": self.zero_layers}


@dataclass(frozen=True)
class Operator:
    """A plan family with its parameters: ``Operator("llama_pro", (8,))``; ``str()`` is its spelling.

    Build one with the family functions (:func:`solar`, :func:`llama_pro`, ...) or :func:`parse_plan`,
    which check the parameters that do not depend on the base; :meth:`plan` checks the rest.
    """

    family: str
    args: tuple[int, ...]
    by: str | None = None

    def __str__(self) -> str:
        by = f", by={self.by}" if self.by is not None else ""
        return f"{self.family}({', '.join(str(a) for a in self.args)}{by})"

    def needs(self, n: int) -> tuple[Need, ...]:
        """The measurements of the base that :meth:`plan` needs for ``n`` layers (none for most)."""
        if self.family == "similar":
            m = self.args[0]
            _check_similar(n, m)
            return (("angular", 1),) if 0 < n - 2 * m < n else ()  # one candidate window: nothing to choose
        if self.family == "prune" and self.by != "last":
            k = self.args[0]
            _check_prune(n, k, self.by)
            if k == 0:
                return ()
            return (("gromov", k),) if self.by == "angular" else (("influence", 1),)
        return ()

    def check(self, n: int) -> None:
        """Raise :class:`PlanError` where the parameters do not fit a base of ``n`` layers (a study checks
        every operator against every base before it runs), without measurements."""
        if not self.needs(n):  # needs() checks the ranges of the measured families
            self.plan(n)

    def plan(self, n: int, measured: Measured | None = None) -> Plan:
        """The plan for a base of ``n`` layers; ``measured`` holds what :meth:`needs` asks for."""
        if not _is_int(n) or n < 1:
            raise PlanError(f"{self}: a base model needs at least one layer, got n={n!r}")
        needs = self.needs(n)
        missing = [need for need in needs if measured is None or need not in measured]
        if missing:
            raise PlanError(f"{self} chooses layers by measured redundancy of the base and got no {missing[0][0]} "
                            "measurement; pass measured=ablate.redundancy.measure(model, rows, op.needs(n))")
        values = {need: _measurement(self, n, need, measured[need]) for need in needs}
        sources, zero = _BUILDERS[self.family](n, *self.args, *((self.by,) if self.family == "prune" else ()),
                                               values=values)
        return Plan.of(n, sources, zero, str(self))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _measurement(op: Operator, n: int, need: Need, values: Sequence[float]) -> list[float]:
    kind, k = need
    want = n - k + 1
    out = [float(v) for v in values]
    if len(out) != want or not all(math.isfinite(v) for v in out):
        raise PlanError(f"{op}: the {kind} measurement for k={k} needs {want} finite values for n={n}, "
                        f"got {len(out)}; measure the base this plan is for")
    return out


# ---------------------------------------------------------------------------------------------
# The families: a constructor that checks what does not depend on n, a builder that makes the plan.


def _nonneg(family: str, name: str, value, low: int = 0) -> int:
    if not _is_int(value):
        raise PlanError(f"{family}: {name} must be an integer, got {name}={value!r}")
    if value < low:
        raise PlanError(f"{family}: {name}={value} must be at least {low}")
    return value


def solar(m: int) -> Operator:
    """SOLAR's DUS: two copies, the last ``m`` layers of one and the first ``m`` of the other dropped."""
    if not _is_int(m):  # the range depends on n; _check names both
        raise PlanError(f"m must be an integer, got m={m!r}")
    return Operator("solar", (m,))


def stack(g: int) -> Operator:
    """G_stack's depthwise stacking: ``g`` copies of the whole model."""
    return Operator("stack", (_nonneg("stack", "g", g, 1),))


def llama_pro(p: int) -> Operator:
    """LLaMA Pro: a zero-output copy after every ``n/p`` blocks, ``p`` in all."""
    return Operator("llama_pro", (_nonneg("llama_pro", "p", p, 1),))


def mid(start: int, width: int, copies: int) -> Operator:
    """The block of ``width`` layers from ``start`` repeated ``copies`` times in place."""
    return Operator("mid", (_nonneg("mid", "start", start), _nonneg("mid", "width", width, 1),
                            _nonneg("mid", "copies", copies, 1)))


def similar(m: int) -> Operator:
    """SOLAR's shape and depth with the duplicated window placed where the base is most redundant."""
    return Operator("similar", (_nonneg("similar", "m", m),))


def prune(k: int, by: str) -> Operator:
    """Remove ``k`` layers chosen ``by`` angular distance (Gromov et al.), block influence (ShortGPT) or
    position (the last ``k``)."""
    _nonneg("prune", "k", k)
    if by not in PRUNE_BY:
        raise PlanError(f"prune({k}, by={by}): by must be one of {', '.join(PRUNE_BY)}, "
                        f"e.g. prune({k}, by=angular)")
    return Operator("prune", (k,), by)


def _check(n: int, m: int) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise PlanError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if n < 1:
        raise PlanError(f"n={n}, m={m}: a base model needs at least one layer")
    if not 0 <= m < n:
        raise PlanError(f"m={m} is out of range for n={n}: choose 0 <= m < n (m = n/2 is the base model)")


def _check_similar(n: int, m: int) -> None:
    if 2 * m > n:
        raise PlanError(f"similar({m}) duplicates n - 2m layers and needs 0 <= m <= n/2, but n={n}; "
                        f"for fewer layers use prune(k, by=angular)")


def _check_prune(n: int, k: int, by: str) -> None:
    if k >= n:
        raise PlanError(f"prune({k}, by={by}) removes {k} of n={n} layers and must leave one; choose 0 <= k < {n}")


def _solar(n, m, *, values):
    _check(n, m)
    return list(range(n - m)) + list(range(m, n)), ()


def _stack(n, g, *, values):
    return list(range(n)) * g, ()


def _llama_pro(n, p, *, values):
    if n % p:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise PlanError(f"llama_pro({p}) inserts a block after every n/p base blocks, so p must divide n={n}; "
                        f"choose p in {divisors}")
    group = n // p
    sources, zero = [], []
    for i in range(n):
        sources.append(i)
        if (i + 1) % group == 0:
            zero.append(len(sources))
            sources.append(i)
    return sources, zero


def _mid(n, start, width, copies, *, values):
    end = start + width
    if end > n:
        raise PlanError(f"mid({start}, {width}, {copies}): the block {start}..{end - 1} lies outside a model of "
                        f"n={n} layers (0..{n - 1}); choose start + width <= {n}")
    return list(range(end)) + list(range(start, end)) * (copies - 1) + list(range(end, n)), ()


def _similar(n, m, *, values):
    _check_similar(n, m)
    w = n - 2 * m  # the duplicated window's width; the first copy keeps 0..b+w-1, the second b..n-1
    candidates = range(0, 2 * m + 1)
    if ("angular", 1) in values:
        d = values[("angular", 1)]
        b = min(candidates, key=lambda b: (sum(d[b:b + w]), abs(b - m), b))
    else:  # w == 0 (the base) or w == n (m = 0, the whole model twice): one window
        b = m
    return list(range(b + w)) + list(range(b, n)), ()


def _prune(n, k, by, *, values):
    _check_prune(n, k, by)
    if k == 0:
        return list(range(n)), ()
    if by == "last":
        drop = set(range(n - k, n))
    elif by == "angular":
        d = values[("gromov", k)]
        start = min(range(len(d)), key=lambda i: (d[i], i))  # Gromov et al.: argmin over l of d(x^l, x^(l+k))
        drop = set(range(start, start + k))
    else:
        bi = values[("influence", 1)]
        drop = set(sorted(range(n), key=lambda i: (bi[i], i))[:k])  # ShortGPT: the k of least block influence
    return [i for i in range(n) if i not in drop], ()


_BUILDERS = {"solar": _solar, "stack": _stack, "llama_pro": _llama_pro, "mid": _mid, "similar": _similar,
             "prune": _prune}
_CONSTRUCTORS = {"solar": solar, "stack": stack, "llama_pro": llama_pro, "mid": mid, "similar": similar,
                 "prune": prune}


# ---------------------------------------------------------------------------------------------
# The spelling: ``family(arg, ..., key=value)``.

_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*", re.S)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_plan(text) -> Operator:
    """An operator from its spelling, ``"llama_pro(8)"``, ``"prune(4, by=angular)"``; an Operator is returned
    as is. A bad spelling is a one-line :class:`PlanError` naming the fix."""
    if isinstance(text, Operator):
        return text
    if not isinstance(text, str):
        raise PlanError(f"a plan is written as text like 'llama_pro(8)', got {text!r}; families: {SPELLINGS}")
    match = _CALL.fullmatch(text)
    if match is None:
        word = _WORD.match(text.strip())
        hint = f" (did you mean {word.group()}(...)?)" if word else ""
        raise PlanError(f"plan {text!r} is not a family with its parameters in parentheses{hint}; "
                        f"families: {SPELLINGS}")
    family, inner = match.group(1), match.group(2)
    if family not in FAMILIES:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise PlanError(f"unknown plan family {family!r} in {text!r}; {hint}families: {SPELLINGS}")
    names = FAMILIES[family]
    usage = f"{family}({', '.join(names)})" if family != "prune" else "prune(k, by=angular|influence|last)"
    parts = [p.strip() for p in inner.split(",")] if inner.strip() else []
    values: dict[str, object] = {}
    named = False
    for position, part in enumerate(parts):
        key, sep, raw = part.partition("=")
        if sep:
            key, raw, named = key.strip(), raw.strip(), True
            if key not in names:
                raise PlanError(f"{family} has no parameter {key!r} (in {text!r}); write {usage}")
        elif named:
            raise PlanError(f"in {text!r} a positional parameter follows a named one; write {usage}")
        else:
            if position >= len(names):
                raise PlanError(f"{family} takes {len(names)} parameter{'s' * (len(names) > 1)}, got {len(parts)} "
                                f"in {text!r}; write {usage}")
            key, raw = names[position], part
        if key in values:
            raise PlanError(f"{family} got {key} twice in {text!r}; write {usage}")
        if key == "by":
            values[key] = raw
        elif re.fullmatch(r"[+-]?\d+", raw):
            values[key] = int(raw)
        else:
            raise PlanError(f"{family}: {key} must be an integer, got {raw!r} in {text!r}; write {usage}")
    missing = [name for name in names if name not in values]
    if missing:
        raise PlanError(f"{text!r} lacks {missing[0]}; write {usage}")
    return _CONSTRUCTORS[family](**values)


def resolve_plan(spec, n: int, measured: Measured | None = None) -> Plan:
    """The plan of ``spec`` (text, an Operator or a Plan) for a base of ``n`` layers."""
    if isinstance(spec, Plan):
        if spec.n != n:
            raise PlanError(f"plan {spec.label} is for a base of {spec.n} layers, but the model has {n}")
        return spec
    return parse_plan(spec).plan(n, measured)


# ---------------------------------------------------------------------------------------------
# SOLAR's plan as plain lists (the DUS study and its figures use these).


def layer_plan(n: int, m: int) -> list[int]:
    """The base-layer index of each layer of DUS(n, m): ``[0 .. n-m-1] + [m .. n-1]``.

    >>> layer_plan(32, 8)[:3], layer_plan(32, 8)[22:26], len(layer_plan(32, 8))
    ([0, 1, 2], [22, 23, 8, 9], 48)
    """
    _check(n, m)
    return list(range(n - m)) + list(range(m, n))


def upscaled_depth(n: int, m: int) -> int:
    """``s = 2 (n - m)``, the number of layers of DUS(n, m)."""
    _check(n, m)
    return 2 * (n - m)


def mergekit_slices(n: int, m: int) -> list[tuple[int, int]]:
    """The plan as mergekit ``passthrough`` layer ranges (half-open ``[start, end)``)."""
    _check(n, m)
    return [(0, n - m), (m, n)]
