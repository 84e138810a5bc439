"""Complete verification by mixed-integer linear programming, and the Ground-Truth Attack.

A ReLU network is exactly a set of linear constraints plus one binary per unstable neuron
(Tjeng, Xiao & Tedrake 2019, arXiv 1711.07356): for a pre-activation ``z`` with bounds
``l < 0 < u`` and its output ``a``,

    a >= 0,  a >= z,  a <= u * d,  a <= z - l * (1 - d),  d in {0, 1},

and a neuron whose bounds do not straddle zero is linear (``a = z`` or ``a = 0``). The
bounds are the big-M constants: the tighter they are, the fewer neurons need a binary and
the smaller the search, so they come from CROWN (:func:`advkit.verify.bounds.layer_bounds`)
on the same input set.

* :func:`verify` minimises each margin ``z_y - z_j`` over the threat model's set (Linf or
  L1 ball intersected with the box; L2 is a quadratic constraint, which a MILP solver does
  not take: use CROWN or randomised smoothing there). Each sample ends ``verified`` (every
  minimum > 0), ``falsified`` (a counter-example, confirmed adversarial by a fresh float64
  forward pass of the model) or ``timeout``.
* :func:`ground_truth` is the Ground-Truth Attack (Carlini, Katz, Barrett & Dill 2017,
  arXiv 1709.10207): the provably smallest Linf or L1 perturbation that makes some other
  class's logit exceed the label's by ``delta``, minimised as the MILP's objective.

The solver is HiGHS through :func:`scipy.optimize.milp` (scipy is already a dependency;
HiGHS is maintained and open source). Answers are exact up to the solver's tolerances
(about 1e-6 on each constraint), which is why counter-examples are checked by a forward
pass and not taken from the solver. Only small networks are in reach: the work grows
exponentially with the number of unstable neurons.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, sparse
from torch import Tensor, nn

from advkit.progress import progress_bar
from advkit.threat import ThreatModel, canonical_norm
from advkit.verify.bounds import InputSet, Interval, Network, backward_lower, layer_bounds, network

#: The norms a MILP can encode (an L2 ball is a quadratic constraint).
MILP_NORMS = ("linf", "l1")

#: The three outcomes of a complete verification, and the fourth when the solver's answer
#: sits within its tolerance of zero and the forward pass does not confirm it.
STATUSES = ("verified", "falsified", "timeout", "undecided")


@dataclass(frozen=True)
class Verification:
    """What complete verification decided about each image.

    Attributes:
        threat: the threat model verified against.
        status: one of :data:`STATUSES` per image.
        lower_bounds: (N, classes): the minimum of ``z_y - z_j`` over the set where the
            solver finished, the solver's proven lower bound where it timed out, CROWN's
            where CROWN had already proved the margin positive; ``+inf`` at ``j == y``.
        counterexamples: (N, *x) adversarial images inside the set where ``falsified``,
            NaN elsewhere.
        seconds: (N,) solver time per image.
    """

    threat: ThreatModel
    status: list[str]
    lower_bounds: Tensor
    counterexamples: Tensor
    seconds: Tensor

    @property
    def verified(self) -> Tensor:
        return torch.tensor([s == "verified" for s in self.status], dtype=torch.bool)

    @property
    def falsified(self) -> Tensor:
        return torch.tensor([s == "falsified" for s in self.status], dtype=torch.bool)


@dataclass(frozen=True)
class GroundTruth:
    """The Ground-Truth Attack's answer per image.

    Attributes:
        norm: ``"linf"`` or ``"l1"``.
        distance: (N,) the smallest perturbation (within ``cap``) that gives some class a
            logit ``delta`` above the label's; ``inf`` where none exists within the cap
            (the image is then verified at ``cap``); NaN where the solver timed out before
            finding one.
        lower: (N,) a proven lower bound on that smallest distance (equal to ``distance``
            where solved; the cap where none exists).
        x_adv: (N, *x) the minimal adversarial images (NaN where none was found).
        status: ``"optimal"``, ``"none within cap"`` or ``"timeout"`` per image.
        seconds: (N,) solver time per image.
    """

    norm: str
    distance: Tensor
    lower: Tensor
    x_adv: Tensor
    status: list[str]
    seconds: Tensor


# --------------------------------------------------------------------------------------
# The network as affine segments between ReLUs
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layers:
    """``weights[k], biases[k]`` map layer ``k``'s input (the image for k = 0, else the
    k-th ReLU's output) to the next ReLU's input (the logits for the last); ``relus[k]``
    is the op index of the k-th ReLU (its bounds are ``bounds[relus[k]]``)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    relus: list[int]


def _affine(op_chain: list, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The matrix and offset of a chain of affine ops, read off their forward pass on the
    zero image and the unit vectors (exact for affine maps)."""
    d = math.prod(shape)
    with torch.no_grad():
        basis = torch.cat([torch.zeros(1, d, dtype=dtype, device=device),
                           torch.eye(d, dtype=dtype, device=device)]).view(d + 1, *shape)
        out = basis
        for op in op_chain:
            out = op.forward(out)
        out = out.flatten(1).double().cpu().numpy()
    return (out[1:] - out[0]).T.copy(), out[0].copy()


def _layers(net: Network, device: torch.device, dtype: torch.dtype) -> _Layers:
    weights, biases, relus, chain, start = [], [], [], [], 0
    for i, op in enumerate(net.ops):
        if op.kind == "maxpool":
            raise ValueError(
                f"MILP encodes ReLU networks; op {i} ({op.name}) is max pooling. Use "
                "certify(method='crown') on this model, or a model with average pooling")
        if op.kind == "relu":
            w, b = _affine(chain, net.shapes[start], device, dtype)
            weights.append(w), biases.append(b), relus.append(i)
            chain, start = [], i + 1
        else:
            chain.append(op)
    w, b = _affine(chain, net.shapes[start], device, dtype)
    weights.append(w), biases.append(b)
    return _Layers(weights, biases, relus)


# --------------------------------------------------------------------------------------
# One sample's MILP
# --------------------------------------------------------------------------------------

class _Program:
    """The constraints shared by every margin of one sample: the input set and the
    network. Variables, in order: the image, then per ReLU layer its inputs ``z``, its
    outputs ``a`` and one binary per unstable neuron, then (L1) the perturbation's
    positive and negative parts, and last (Ground-Truth) the distance ``t``."""

    def __init__(self, layers: _Layers, bounds: list[Interval], center: np.ndarray,
                 box: tuple[np.ndarray, np.ndarray], norm: str, eps: float,
                 minimise_distance: bool, relax: bool = False) -> None:
        self.rows: list[sparse.spmatrix] = []
        self.lo_rows: list[np.ndarray] = []
        self.hi_rows: list[np.ndarray] = []
        self.lower: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.size = 0
        d = center.size
        self.x = self._vars(box[0], box[1])
        previous = self.x
        for k, relu in enumerate(layers.relus):
            low = bounds[relu][0].detach().flatten().double().cpu().numpy()
            up = bounds[relu][1].detach().flatten().double().cpu().numpy()
            z = self._vars(low, up)
            self._add({z: sparse.identity(len(z), format="csr"),
                       previous: -sparse.csr_matrix(layers.weights[k])},
                      layers.biases[k], layers.biases[k])
            a = self._vars(np.maximum(low, 0), np.maximum(up, 0))
            active, open_ = low >= 0, (low < 0) & (up > 0)
            # Active neurons: a = z. Inactive ones have a in [0, 0] from their bounds.
            idx = np.flatnonzero(active)
            if len(idx):
                self._add({a: _select(idx, len(a)), z: -_select(idx, len(z))}, 0.0, 0.0)
            idx = np.flatnonzero(open_)
            if len(idx):
                delta = self._vars(np.zeros(len(idx)), np.ones(len(idx)), integer=not relax)
                one = sparse.identity(len(idx), format="csr")
                sel_a, sel_z = _select(idx, len(a)), _select(idx, len(z))
                self._add({z: sel_z, a: -sel_a}, -np.inf, 0.0)                  # a >= z
                self._add({a: sel_a, delta: -sparse.diags(up[idx])}, -np.inf, 0.0)  # a <= u d
                self._add({a: sel_a, z: -sel_z, delta: -sparse.diags(low[idx])},  # a <= z-l(1-d)
                          -np.inf, -low[idx])
                del one
            previous = a
        self.last = previous
        self.w_out, self.b_out = layers.weights[-1], layers.biases[-1]
        self.t = None
        if norm == "l1":
            # x = center + p - q, sum(p + q) <= eps (or = t when minimised).
            p = self._vars(np.zeros(d), np.full(d, np.inf))
            q = self._vars(np.zeros(d), np.full(d, np.inf))
            eye = sparse.identity(d, format="csr")
            self._add({self.x: eye, p: -eye, q: eye}, center, center)
            if minimise_distance:
                self.t = self._vars(np.zeros(1), np.array([eps]))
                ones = sparse.csr_matrix(np.ones((1, d)))
                self._add({p: ones, q: ones, self.t: -sparse.identity(1)}, 0.0, 0.0)
            else:
                self._add({p: sparse.csr_matrix(np.ones((1, d))),
                           q: sparse.csr_matrix(np.ones((1, d)))}, -np.inf, eps)
        elif minimise_distance:  # Linf: |x - center| <= t
            self.t = self._vars(np.zeros(1), np.array([eps]))
            eye, col = sparse.identity(d, format="csr"), sparse.csr_matrix(np.ones((d, 1)))
            self._add({self.x: eye, self.t: -col}, -np.inf, center)
            self._add({self.x: eye, self.t: col}, center, np.inf)

    def _vars(self, lower: np.ndarray, upper: np.ndarray, integer: bool = False) -> range:
        """A block of ``len(lower)`` new variables (a ``range`` of their columns)."""
        n = len(lower)
        block = range(self.size, self.size + n)
        self.size += n
        self.lower.append(np.asarray(lower, dtype=float))
        self.upper.append(np.asarray(upper, dtype=float))
        self.integer.append(np.full(n, 1 if integer else 0))
        return block

    def _add(self, terms: dict[range, sparse.spmatrix], lo, hi) -> None:
        """Constraint rows ``lo <= sum_terms M @ v[slice] <= hi`` (columns placed later)."""
        self.rows.append(terms)
        m = next(iter(terms.values())).shape[0]
        self.lo_rows.append(np.broadcast_to(np.asarray(lo, dtype=float), (m,)))
        self.hi_rows.append(np.broadcast_to(np.asarray(hi, dtype=float), (m,)))

    def _block_rows(self, terms: dict[range, sparse.spmatrix]) -> sparse.coo_matrix:
        """One group of constraint rows, its blocks placed at their variables' columns."""
        m = next(iter(terms.values())).shape[0]
        rows, cols, vals = [], [], []
        for block, mat in terms.items():
            coo = sparse.coo_matrix(mat)
            rows.append(coo.row), cols.append(coo.col + block.start), vals.append(coo.data)
        return sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                         np.concatenate(cols))),
                                 shape=(m, self.size))

    def matrix(self, extra: list[tuple[dict[range, np.ndarray], float, float]] = ()
               ) -> optimize.LinearConstraint:
        if getattr(self, "_base", None) is None or self._base.shape[1] != self.size:
            # The network's rows are the same for every margin of the sample: built once.
            self._base = sparse.vstack([self._block_rows(t) for t in self.rows]).tocsr()
        blocks, lo, hi = [self._base], list(self.lo_rows), list(self.hi_rows)
        for terms, a, b in extra:
            blocks.append(self._block_rows({k: sparse.csr_matrix(v) for k, v in terms.items()}))
            lo.append(np.array([a])), hi.append(np.array([b]))
        return optimize.LinearConstraint(sparse.vstack(blocks).tocsr(), np.concatenate(lo),
                                         np.concatenate(hi))

    def margin(self, row: np.ndarray) -> tuple[np.ndarray, float]:
        """``row · logits`` as coefficients on the variables, and its constant."""
        c = np.zeros(self.size)
        c[_cols(self.last)] = row @ self.w_out
        return c, float(row @ self.b_out)

    def solve(self, c: np.ndarray, extra: list, time_limit: float, gap: float = 0.0,
              highs: dict | None = None):
        """``scipy.optimize.milp``; ``highs``: further HiGHS options, passed through (scipy
        warns that it does not know them; the warning is silenced)."""
        bounds = optimize.Bounds(np.concatenate(self.lower), np.concatenate(self.upper))
        options = {"time_limit": max(time_limit, 1e-3), "disp": False, "mip_rel_gap": gap,
                   **(highs or {})}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            return optimize.milp(c, integrality=np.concatenate(self.integer), bounds=bounds,
                                 constraints=self.matrix(extra), options=options)


def _cols(block: range) -> slice:
    return slice(block.start, block.stop)


def _select(idx: np.ndarray, n: int) -> sparse.csr_matrix:
    """Rows picking the entries ``idx`` of a vector of length ``n``."""
    return sparse.csr_matrix((np.ones(len(idx)), (np.arange(len(idx)), idx)),
                             shape=(len(idx), n))


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------

def _prepare(model: nn.Module, x: Tensor, y: Tensor, norm: str) -> tuple[Network, nn.Module]:
    if canonical_norm(norm) not in MILP_NORMS:
        raise ValueError(f"MILP encodes Linf and L1 balls (got {norm!r}): an L2 ball is a "
                         "quadratic constraint. Use certify(method='crown') or randomised "
                         "smoothing for L2")
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"x must be (N, ...) and y (N,) with the same N (got x "
                         f"{tuple(x.shape)}, y {tuple(y.shape)})")
    net = network(model, x[:1] if len(x) else torch.zeros(1, *x.shape[1:]))
    if len(y) and (y.min() < 0 or y.max() >= net.num_classes):
        raise ValueError(f"labels must lie in [0, {net.num_classes - 1}] (got "
                         f"{int(y.min())}..{int(y.max())})")
    # Counter-examples are judged by a float64 copy: a float32 pass could round a
    # solver's margin of 1e-6 either way.
    checker = copy.deepcopy(model).double().eval()
    return net, checker


def _status(res) -> str:
    if res.status == 0:
        return "optimal"
    if res.status == 2:
        return "infeasible"
    if res.status == 1:
        return "limit"
    raise RuntimeError(f"the MILP solver failed: {res.message}")


#: Sign-deciding mode (``verify``'s default): a margin's MILP gets the constraint
#: ``margin <= SIGN_CUTOFF`` and stops at its first solution. Infeasible proves the margin
#: above the cutoff (less the solver's tolerance, about 1e-6); the margin's lower bound is
#: then reported as ``SIGN_CUTOFF / 2`` (or CROWN's, where larger).
SIGN_CUTOFF = 1e-3

#: HiGHS options of verify's sign-deciding solves and of the Ground-Truth Attack: its
#: primal heuristics (RINS, RENS, the root reduced-cost and feasibility-jump heuristics)
#: spent most of the time, and turning them off was 2-6x faster on the hard images of
#: benchmarks/milp.py (verify: counter-examples included, found by branching instead;
#: the Ground-Truth Attack: 2-3x, the same minima). Exact minima (``gap=0``) keep HiGHS's
#: defaults.
HIGHS_OPTIONS = {"mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False,
                 "mip_heuristic_run_root_reduced_cost": False,
                 "mip_heuristic_run_feasibility_jump": False}


def _minimise_margins(program: _Program, rows: np.ndarray, crown: np.ndarray,
                      time_limit: float, accept: Callable[[np.ndarray], bool],
                      gap: float | None
                      ) -> tuple[np.ndarray, str, np.ndarray | None]:
    """Minimise the margins ``rows · logits`` (S, classes) of one sample that CROWN's
    bounds ``crown`` (S,) leave unproven, least certain first, until one goes negative at
    a point ``accept`` confirms. With a ``gap``, the solver stops once its proven bound is
    within that relative gap of its best point (a bound above 0 decides a margin before
    the exact minimum is known). With ``gap=None`` it only decides the sign: the margin is
    constrained to at most :data:`SIGN_CUTOFF` and the solver stops at the first solution
    (a candidate counter-example) or at the proof that there is none (far cheaper than a
    minimum: the constraint prunes every branch whose bound is above the cutoff). Returns
    the lower bounds (S,), the verdict and the confirmed counter-example (the image's
    variables) or None."""
    start = time.perf_counter()
    lower, verdict = crown.astype(float).copy(), "verified"
    everything = range(program.size)
    for r in np.argsort(crown, kind="stable").tolist():
        if crown[r] > 0:
            continue
        left = time_limit - (time.perf_counter() - start)
        if left <= 0:
            return lower, "timeout" if verdict == "verified" else verdict, None
        c, const = program.margin(rows[r])
        if gap is None:
            res = program.solve(c, [({everything: c[None, :]}, -np.inf,
                                     SIGN_CUTOFF - const)], left, math.inf, HIGHS_OPTIONS)
            state = _status(res)
            if state == "infeasible":  # no point of the set has margin <= the cutoff
                lower[r] = max(crown[r], SIGN_CUTOFF / 2)
                continue
            if (state == "optimal" and res.fun + const < 0
                    and accept(res.x[_cols(program.x)])):
                dual = res.mip_dual_bound if res.mip_dual_bound is not None else -math.inf
                lower[r] = max(dual + const, crown[r])
                return lower, "falsified", res.x[_cols(program.x)]
            if state == "optimal":
                # A point within the cutoff of 0 that no forward pass confirms: the exact
                # minimum decides.
                res = program.solve(c, [], time_limit - (time.perf_counter() - start), 0.0)
        else:
            res = program.solve(c, [], left, gap)
            if (gap and _status(res) == "optimal" and res.fun + const >= 0
                    and not (res.mip_dual_bound or 0) + const > 0):
                # Within the gap but not of one sign (HiGHS's gap is relative to
                # max(1, |best|) or so): this margin needs the exact minimum.
                res = program.solve(c, [], time_limit - (time.perf_counter() - start), 0.0)
        state = _status(res)
        if state == "infeasible":  # the set is never empty: a solver or encoding fault
            raise RuntimeError("the MILP of a non-empty input set was infeasible: report "
                               "this with the model and input")
        exact = state == "optimal" and (gap is None or gap == 0)
        dual = res.mip_dual_bound if res.mip_dual_bound is not None else (
            res.fun if exact else -math.inf)
        lower[r] = max(dual + const, crown[r])
        if res.x is not None and res.fun + const < 0 and accept(res.x[_cols(program.x)]):
            return lower, "falsified", res.x[_cols(program.x)]
        if not lower[r] > 0 and verdict == "verified":
            # Out of time, or a minimum within the solver's tolerance of 0 that no forward
            # pass confirms: neither side is proven.
            verdict = "timeout" if state == "limit" else "undecided"
    return lower, verdict, None


#: How far LP-tightened bounds are widened: the LP solver's answers are exact only to
#: its feasibility tolerance (1e-7), and a bound must never cut off a reachable value.
LP_SLACK = 1e-6


def _tighten(layers: _Layers, bounds: list[Interval], region: InputSet, i: int,
             deadline: float) -> list[Interval]:
    """Sample ``i``'s bounds with every ReLU layer after the first tightened by linear
    programming (Tjeng, Xiao & Tedrake 2019): each unstable pre-activation minimised and
    maximised over the LP relaxation of the layers before it (their bounds already
    tightened). Fewer unstable neurons and smaller big-M constants make the MILP far
    cheaper. Stops tightening (keeping CROWN's bounds) at ``deadline``."""
    bounds = [(lo[i:i + 1].clone(), hi[i:i + 1].clone()) for lo, hi in bounds]
    one = _one(region, i)
    for k in range(1, len(layers.relus)):
        position = layers.relus[k]
        low, up = (t.detach().flatten().double().cpu().numpy().copy() for t in bounds[position])
        open_ = np.flatnonzero((low < 0) & (up > 0))
        if not len(open_):
            continue
        sub = _Layers(layers.weights[:k + 1], layers.biases[:k + 1], layers.relus[:k])
        program = _sample_program(sub, bounds, one, 0, relax=True)
        for j in open_.tolist():
            for sign in (1.0, -1.0):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                row = np.zeros(len(low))
                row[j] = sign
                c, const = program.margin(row)
                res = program.solve(c, [], left)
                if res.status != 0:
                    continue  # out of time: keep the bound we have
                value = sign * (res.fun + const)
                if sign > 0:
                    low[j] = max(low[j], value - LP_SLACK)
                else:
                    up[j] = min(up[j], value + LP_SLACK)
        like = bounds[position][0]
        bounds[position] = (torch.from_numpy(low).to(like).view_as(like),
                            torch.from_numpy(up).to(like).view_as(like))
    return bounds


def _sample_program(layers: _Layers, bounds: list[Interval], region: InputSet, i: int,
                    minimise_distance: bool = False, relax: bool = False) -> _Program:
    return _Program(layers, [(lo[i:i + 1], hi[i:i + 1]) for lo, hi in bounds],
                    region.center[i].flatten().double().cpu().numpy(),
                    (region.lower[i].flatten().double().cpu().numpy(),
                     region.upper[i].flatten().double().cpu().numpy()),
                    region.norm, _radius(region.eps, i), minimise_distance, relax)


def _one(region: InputSet, i: int) -> InputSet:
    """Sample ``i`` of a batched input set, as a set of one."""
    return InputSet(region.center[i:i + 1], _radius(region.eps, i), region.norm,
                    region.lower[i:i + 1], region.upper[i:i + 1])


def _radius(eps: float | Tensor, i: int) -> float:
    """Sample ``i``'s radius: the set's one eps, or its own (a tensor, one per sample)."""
    return float(eps.flatten()[i]) if isinstance(eps, Tensor) else float(eps)


def milp_lower(net: Network, region: InputSet, spec: Tensor, *, margin_rows: int,
               time_limit: float = 60.0, gap: float = 0.0, **_: object) -> Tensor:
    """``certify``'s ``"milp"`` method: CROWN's lower bounds on ``spec · logits``, with
    each sample's first ``margin_rows`` rows that CROWN leaves at or below zero replaced
    by their exact minimum (or the solver's proven bound when ``time_limit`` seconds per
    sample run out), until one is negative (the sample is then not verified)."""
    if canonical_norm(region.norm) not in MILP_NORMS:
        raise ValueError(f"MILP encodes Linf and L1 balls (got {region.norm!r}): an L2 ball "
                         "is a quadratic constraint. Use method='crown' for L2")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds (got {time_limit})")
    bounds = layer_bounds(net, region, "crown")
    lower = backward_lower(net, region, bounds, spec)
    layers = _layers(net, region.center.device, region.center.dtype)
    out = lower.double().cpu().numpy().copy()
    for i in range(len(spec)):
        head = out[i, :margin_rows]
        if (head > 0).all():
            continue
        start = time.perf_counter()
        tight = _tighten(layers, bounds, region, i, start + time_limit / 2)
        program = _sample_program(layers, tight, _one(region, i), 0)
        rows = spec[i, :margin_rows].double().cpu().numpy()
        out[i, :margin_rows], _, _ = _minimise_margins(
            program, rows, head, time_limit - (time.perf_counter() - start),
            lambda _x: True, gap)
    return torch.from_numpy(out).to(lower)


def verify(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
           time_limit: float = 60.0, gap: float | None = None, attack_steps: int = 100,
           progress: bool = False) -> Verification:
    """Complete verification: decide for each image whether any point of ``threat``'s set
    is classified other than ``y``.

    A sample is attacked first (PGD on the logit margin, 3 restarts of ``attack_steps``
    steps): a counter-example it finds, confirmed by a float64 forward pass, settles the
    sample without the solver. For the rest, margins CROWN already proves positive are not
    sent to the solver; the others go to it in the order of CROWN's bounds (the least
    certain first), and a sample stops at its first confirmed counter-example. By default
    the solver only decides each margin's sign: the margin is constrained to at most
    :data:`SIGN_CUTOFF` (1e-3), and the solve ends at the first point that satisfies it
    (checked by a forward pass; one within the cutoff of 0 that is not adversarial sends
    the margin to an exact solve) or at the proof that none exists, with HiGHS's primal
    heuristics off (:data:`HIGHS_OPTIONS`). On the hard images of ``benchmarks/milp.py``
    (784-50-50-10, Linf 0.05) that took 5-20 s per image where minimising to a relative
    gap of 0.5 (the earlier default) took 17-60 s or more. With ``gap`` a
    number, each margin is minimised until the solver's proven bound is within that
    relative gap of its best point (``gap=0``: the exact minimum).

    Args:
        model: an eval-mode ``nn.Sequential`` ReLU network (see
            :func:`advkit.verify.bounds.network`; max pooling is refused).
        x, y: images (N, ...) in ``threat.bounds`` and labels (N,).
        threat: a Linf or L1 threat model.
        time_limit: seconds of solver time per image (over all its margins).
        gap: None (decide signs, see above) or the solver's relative optimality gap;
            ``lower_bounds`` are the solver's proven bounds, exact minima only with
            ``gap=0`` (with ``gap=None`` a margin proven above the cutoff is reported as
            ``SIGN_CUTOFF / 2``, or CROWN's bound where larger).
        attack_steps: PGD steps per restart before the solver (0: no attack).
        progress: a progress bar over images.

    Raises:
        ValueError: an L2 threat, a layer the encoding does not support, a train-mode
            model, x outside the box, bad shapes or labels, time_limit <= 0, gap < 0.
    """
    from advkit.verify.certify import _check, _spec

    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds (got {time_limit})")
    if (gap is not None and not gap >= 0) or attack_steps < 0:
        raise ValueError(f"gap and attack_steps must be >= 0 (got {gap}, {attack_steps})")
    _check(model, x, y, threat)
    net, checker = _prepare(model, x, y, threat.norm)
    attacked = _attack(model, x, y, threat, attack_steps)
    params = list(model.parameters())
    x = x.to(params[0].dtype if params else x.dtype)
    layers = _layers(net, x.device, x.dtype)
    classes, n = net.num_classes, len(x)
    status, seconds = [], torch.zeros(n, dtype=torch.float64)
    lower_bounds = torch.full((n, classes), math.inf, dtype=torch.float64)
    examples = torch.full_like(x, math.nan)
    spec = _spec(y.to(x.device), classes, x.dtype)[:, :classes - 1]
    others = ~torch.nn.functional.one_hot(y.to(x.device), classes).bool()
    with progress_bar(progress, "MILP verification", n) as bar:
        for i in range(n):
            start = time.perf_counter()
            region = InputSet.from_threat(x[i:i + 1], threat)
            with torch.no_grad():
                bounds = layer_bounds(net, region, "crown")
                crown = backward_lower(net, region, bounds, spec[i:i + 1])[0]
            lower_bounds[i, others[i].cpu()] = crown.double().cpu()
            if attacked is not None and _adversarial(checker, attacked[i], y[i], threat, x[i]):
                examples[i] = attacked[i]
                status.append("falsified")
                seconds[i] = time.perf_counter() - start
                bar.advance()
                continue
            bounds = _tighten(layers, bounds, region, 0, start + time_limit / 2)
            program = _sample_program(layers, bounds, region, 0)

            def confirmed(values: np.ndarray, i: int = i, region: InputSet = region) -> bool:
                candidate = _candidate(values, x[i], region)
                return _adversarial(checker, candidate, y[i], threat, x[i])

            lower, verdict, found = _minimise_margins(
                program, spec[i].double().cpu().numpy(), crown.double().cpu().numpy(),
                time_limit - (time.perf_counter() - start), confirmed, gap)
            lower_bounds[i, others[i].cpu()] = torch.from_numpy(lower)
            if found is not None:
                examples[i] = _candidate(found, x[i], region)
            status.append(verdict)
            seconds[i] = time.perf_counter() - start
            bar.advance()
    return Verification(threat=threat, status=status, lower_bounds=lower_bounds,
                        counterexamples=examples, seconds=seconds)


def _attack(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int
            ) -> Tensor | None:
    """PGD's adversarial images (margin loss, 3 restarts); None with ``steps == 0`` or
    for inputs that are not images (N, C, H, W), which advkit's attacks take."""
    if steps == 0 or len(x) == 0 or x.dim() != 4:
        return None
    from advkit.attacks import PGD

    return PGD(threat, steps=steps, restarts=3, loss="margin", seed=0)(model, x, y).x_adv


def _candidate(values: np.ndarray, like: Tensor, region: InputSet) -> Tensor:
    """The solver's image, clipped into the set's box (it may overshoot by its tolerance)."""
    candidate = torch.from_numpy(values).to(like).view_as(like)
    return torch.minimum(torch.maximum(candidate, region.lower[0]), region.upper[0])


def _adversarial(checker: nn.Module, candidate: Tensor, label: Tensor,
                 threat: ThreatModel, center: Tensor) -> bool:
    """A fresh float64 forward pass: misclassified, inside the box and the ball."""
    lo, hi = threat.bounds
    inside = bool(candidate.min() >= lo and candidate.max() <= hi)
    distance = float((candidate - center).flatten().double().norm(
        p=math.inf if threat.norm == "linf" else 1))
    with torch.no_grad():
        pred = checker(candidate.unsqueeze(0).double()).argmax(1).item()
    return inside and distance <= threat.eps * (1 + 1e-6) + 1e-9 and pred != int(label)


def check_ground_truth_options(cap: float, delta: float, time_limit: float) -> None:
    """The Ground-Truth Attack's settings, checked (the attack class checks them when built)."""
    if not (cap > 0 and math.isfinite(cap)):
        raise ValueError(f"cap must be a finite distance > 0 (got {cap})")
    if not delta > 0:
        raise ValueError(f"delta must be > 0 (got {delta}): a tie is not a misclassification")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds (got {time_limit})")


def ground_truth(model: nn.Module, x: Tensor, y: Tensor, norm: str = "linf", *,
                 cap: float = 1.0, upper: Tensor | None = None, delta: float = 1e-4,
                 time_limit: float = 120.0, bounds: tuple[float, float] = (0.0, 1.0),
                 progress: bool = False) -> GroundTruth:
    """The Ground-Truth Attack (Carlini, Katz et al. 2017): the provably minimal Linf or L1
    adversarial perturbation of each image, up to ``cap``.

    For each other class ``j`` (least certain by CROWN first) the MILP minimises the
    distance ``t`` subject to ``z_j - z_y >= delta``; once one class gives a distance, the
    later classes are searched only below it (and skipped where CROWN proves them out of
    reach), so the minimum over classes costs little more than its first solve. A
    ``delta`` above the solver's tolerance keeps the answer adversarial by a fresh forward
    pass; the true infimum (delta = 0) is below ``distance`` by at most what ``delta``
    costs (a small multiple of ``delta`` divided by the logits' gradient norm).

    Args:
        model: an eval-mode ``nn.Sequential`` ReLU network.
        x, y: images (N, ...) in ``bounds`` and labels (N,) the model predicts.
        norm: ``"linf"`` or ``"l1"``.
        cap: the largest distance searched.
        upper: (N,) optional distances at which an attack found adversarial examples:
            each image is searched first within ``1.05 * upper + 1e-3`` (a smaller ball
            gives CROWN tighter big-M constants and fewer unstable neurons: much faster),
            and within ``cap`` only if nothing is found there.
        delta: the logit margin a minimal example must reach (> 0).
        time_limit: seconds of solver time per image.
        bounds: the box images lie in.
        progress: a progress bar over images.
    """
    norm = canonical_norm(norm)
    check_ground_truth_options(cap, delta, time_limit)
    if upper is not None and (upper.shape != (len(x),) or (upper < 0).any()):
        raise ValueError(f"upper must hold one distance >= 0 per image (shape ({len(x)},))")
    from advkit.verify.certify import _check

    _check(model, x, y, ThreatModel(norm, cap, bounds))
    net, checker = _prepare(model, x, y, norm)
    params = list(model.parameters())
    dtype = params[0].dtype if params else x.dtype
    x = x.to(dtype)
    layers = _layers(net, x.device, dtype)
    classes, n = net.num_classes, len(x)
    distance = torch.full((n,), math.nan, dtype=torch.float64)
    lower = torch.zeros(n, dtype=torch.float64)
    x_adv = torch.full_like(x, math.nan)
    status, seconds = [], torch.zeros(n, dtype=torch.float64)

    def search(i: int, radius: float, left: float) -> tuple[float, Tensor | None, float, bool]:
        """Within ``radius`` of image i: the best distance, its image, the proven lower
        bound where time ran out, and whether it did."""
        start = time.perf_counter()
        region = InputSet.from_threat(x[i:i + 1], ThreatModel(norm, radius, bounds))
        with torch.no_grad():
            layer_b = layer_bounds(net, region, "crown")
            eye = torch.eye(classes, dtype=dtype, device=x.device)
            crown = backward_lower(net, region, layer_b, (eye[y[i]] - eye).unsqueeze(0)
                                   )[0].double().cpu()
        layer_b = _tighten(layers, layer_b, region, 0, start + left / 2)
        program = _sample_program(layers, layer_b, region, 0, minimise_distance=True)
        best, best_x, proven, timed_out = math.inf, None, math.inf, False
        t_col = np.zeros(program.size)
        t_col[_cols(program.t)] = 1.0
        everything = range(program.size)
        for j in crown.argsort().tolist():
            if j == int(y[i]) or crown[j] > 0:
                continue  # proven out of reach within the radius
            remaining = left - (time.perf_counter() - start)
            if remaining <= 0:
                return best, best_x, 0.0, True
            c_margin, const = program.margin(np.eye(classes)[j] - np.eye(classes)[int(y[i])])
            # z_j - z_y >= delta, and (after a first answer) t <= best.
            extra = [({everything: c_margin[None, :]}, delta - const, np.inf)]
            if math.isfinite(best):
                extra.append(({everything: t_col[None, :]}, -np.inf, best))
            res = program.solve(t_col, extra, remaining, 0.0, HIGHS_OPTIONS)
            state = _status(res)
            if state == "infeasible":
                continue  # no example of class j within the radius (or below best)
            if state == "limit":
                timed_out = True
                proven = min(proven, res.mip_dual_bound if res.mip_dual_bound is not None
                             else 0.0)
            if res.x is not None and res.fun < best:
                best, best_x = float(res.fun), _candidate(res.x[_cols(program.x)], x[i], region)
        return best, best_x, proven, timed_out

    with progress_bar(progress, f"Ground-Truth Attack ({norm})", n) as bar:
        for i in range(n):
            start = time.perf_counter()
            with torch.no_grad():
                if checker(x[i:i + 1].double()).argmax(1).item() != int(y[i]):
                    raise ValueError(f"image {i} is already misclassified: the Ground-Truth "
                                     "Attack measures images the model gets right")
            radius = cap
            if upper is not None and math.isfinite(float(upper[i])):
                radius = min(cap, 1.05 * float(upper[i]) + 1e-3)
            best, best_x, proven, timed_out = search(i, radius, time_limit)
            if best_x is None and not timed_out and radius < cap:
                left = time_limit - (time.perf_counter() - start)
                best, best_x, proven, timed_out = search(i, cap, left)
                proven = min(proven, radius) if timed_out else proven
            if best_x is not None:
                distance[i] = float((best_x - x[i]).flatten().double().norm(
                    p=math.inf if norm == "linf" else 1))
                x_adv[i] = best_x
                lower[i] = min(proven, distance[i]) if timed_out else distance[i]
                status.append("timeout" if timed_out else "optimal")
            elif timed_out:
                lower[i] = proven if math.isfinite(proven) else 0.0
                status.append("timeout")
            else:
                distance[i], lower[i] = math.inf, cap
                status.append("none within cap")
            seconds[i] = time.perf_counter() - start
            bar.advance()
    return GroundTruth(norm=norm, distance=distance, lower=lower, x_adv=x_adv, status=status,
                       seconds=seconds)
