"""An independent float64 NumPy reference of the spec (values and analytic gradients).

It shares no code with the package: it is the spec's formulas, row by row, in float64, with the
gradient written out from SPEC.md section 6 and 7 and the chain rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Result:
    loss: np.ndarray  # [N]
    counted: np.ndarray  # [N] bool
    dlogits: np.ndarray  # [N, V], for the cotangent given
    dlabels: np.ndarray | None  # [N, V] for probability labels
    dtemperature: float
    # [N, V]: the size of the terms whose difference is dlogits, |ct| (|W p| + |a| + |2 z lse p|)
    # |dcap| / T. A float32 gradient that cancels to ~0 is only as exact as these terms allow.
    dlogits_terms: np.ndarray | None = None
    # [N, V]: likewise for dlabels = ct (1 - e) w (lse - z): |ct (1 - e) w| (|lse| + |z|).
    dlabels_terms: np.ndarray | None = None


def cross_entropy(
    logits,
    labels,
    *,
    integer: bool,
    where=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    temperature=1.0,
    ignore_index=None,
    cotangent=None,
) -> Result:
    """Per-example loss and gradients of ``sum_i cotangent_i * loss_i`` for ``[N, V]`` logits."""
    u = np.asarray(logits, np.float64)
    n, v = u.shape
    valid = np.ones((n, v), bool) if where is None else np.broadcast_to(np.asarray(where), (n, v))
    weights = np.ones(v) if class_weights is None else np.asarray(class_weights, np.float64)
    ct = np.ones(n) if cotangent is None else np.asarray(cotangent, np.float64)
    temperature = float(temperature)
    e = label_smoothing

    loss = np.zeros(n)
    counted = np.zeros(n, bool)
    dlogits = np.zeros((n, v))
    terms = np.zeros((n, v))
    label_terms = np.zeros((n, v))
    dlabels = None if integer else np.zeros((n, v))
    dtemperature = 0.0
    with np.errstate(all="ignore"):
        capped = (
            u
            if logit_softcap is None
            else np.where(np.isinf(u), u, logit_softcap * np.tanh(u / logit_softcap))
        )
        z_all = capped / temperature
        dcap = np.ones_like(u) if logit_softcap is None else 1.0 - np.tanh(u / logit_softcap) ** 2
    for i in range(n):
        ok = valid[i]
        if not ok.any():
            continue
        if integer:
            t = int(labels[i])
            if ignore_index is not None and t == ignore_index:
                continue
            counted[i] = True
            if not 0 <= t < v:
                loss[i] = np.nan
                dlogits[i] = np.nan
                continue
            q = np.zeros(v)
            q[t] = 1.0
        else:
            counted[i] = True
            q = np.where(ok, np.asarray(labels[i], np.float64), 0.0)
        n_valid = ok.sum()
        q = (1 - e) * q + np.where(ok, e / n_valid, 0.0)
        a = weights * q
        z = np.where(ok, z_all[i], -np.inf)
        with np.errstate(all="ignore"):
            # Every quantity formed without cancellation, so that float64 keeps relative
            # accuracy where float32 is judged by it: 1 - p_k and sum_{j != k} a_j for the one
            # class where they would cancel (the max, the largest weight) are sums of the rest.
            top = int(np.argmax(z))
            m = z[top]
            exps = np.where(ok, np.exp(z - m), 0.0)
            rest = np.sum(np.delete(exps, top))
            log_s = np.log1p(rest)
            lse = m + log_s
            nll = log_s - (z - m)
            loss[i] = np.sum(np.where(a != 0, a * nll, 0.0)) + z_loss * lse**2
            p = exps / (1.0 + rest)
            one_minus_p = 1.0 - p
            one_minus_p[top] = rest / (1.0 + rest)
            heavy = int(np.argmax(a))
            a_others = a.sum() - a
            a_others[heavy] = np.sum(np.delete(a, heavy))
            # W p_k - a_k = (sum_{j != k} a_j) p_k - a_k (1 - p_k)
            g = a_others * p - a * one_minus_p + 2 * z_loss * lse * p
            dlogits[i] = ct[i] * g * dcap[i] / temperature
            size = np.abs(a.sum() * p) + np.abs(a) + np.abs(2 * z_loss * lse * p)
            terms[i] = np.abs(ct[i] * dcap[i] / temperature) * size
            dtemperature += ct[i] * np.sum(np.where(g != 0, g * -z / temperature, 0.0))
            if dlabels is not None:
                dlabels[i] = np.where(ok, ct[i] * (1 - e) * weights * nll, 0.0)
                size = np.abs(lse) + np.abs(z)
                label_terms[i] = np.where(ok, np.abs(ct[i] * (1 - e) * weights) * size, 0.0)
    return Result(loss, counted, dlogits, dlabels, dtemperature, terms, label_terms)


def _label_weights(result: Result, labels, *, integer: bool, class_weights) -> np.ndarray:
    """``c_i``: the class weight of each counted integer label (1 without; NaN for a label
    outside the classes), 0 elsewhere."""
    c = result.counted.astype(np.float64)
    if integer and class_weights is not None:
        w = np.asarray(class_weights, np.float64)
        t = np.asarray(labels).astype(int)
        picked = [w[k] if 0 <= k < len(w) else np.nan for k in t]
        c = np.where(result.counted, picked, 0.0)
    return c


def _times(u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``u * x``, 0 where ``u`` is 0 (a zero-weight example contributes nothing, NaN or not)."""
    with np.errstate(invalid="ignore"):
        return np.where(u == 0, 0.0, u * x)


def _weighted(result: Result, weights) -> tuple[np.ndarray, np.ndarray]:
    """``(u, u_i l_i)``: the example weights of the counted examples (0 elsewhere) and the
    weighted losses."""
    n = result.loss.shape[0]
    u = np.ones(n) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), n)
    u = np.where(result.counted, u, 0.0)
    return u, _times(u, result.loss)


def reduce(result: Result, labels, *, integer: bool, class_weights, reduction: str, weights=None):
    """The spec's reductions over counted examples (PyTorch's weighted mean), with the example
    ``weights`` ``u`` (``[N]`` or None): ``sum_i u_i l_i / sum_i u_i c_i`` for the mean."""
    u, losses = _weighted(result, weights)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    c = _label_weights(result, labels, integer=integer, class_weights=class_weights)
    denominator = _times(u, c).sum()
    return total / denominator if denominator else 0.0


def reduction_cotangent(
    result: Result, labels, *, integer: bool, class_weights, reduction, weights=None
):
    """``d reduce / d loss_i`` (of the sum of the output for ``"none"``): the cotangent that a
    reduction sends to each example."""
    u, _ = _weighted(result, weights)
    if reduction in ("none", "sum"):
        return u
    c = _label_weights(result, labels, integer=integer, class_weights=class_weights)
    denominator = _times(u, c).sum()
    return u / denominator if denominator else np.zeros_like(u)


def weights_gradient(
    result: Result, labels, *, integer: bool, class_weights, reduction, weights
) -> np.ndarray:
    """``d reduce / d u_i`` (of the sum of the output for ``"none"``): ``l_i`` for the sum, the
    quotient rule ``l_i / D - S c_i / D**2`` for the mean; 0 for an example that does not count,
    and the non-finite loss of an example of weight 0 taken as 0."""
    u, losses = _weighted(result, weights)
    with np.errstate(invalid="ignore"):
        loss = np.where(result.counted, result.loss, 0.0)
        loss = np.where((u == 0) & ~np.isfinite(loss), 0.0, loss)
    if reduction in ("none", "sum"):
        return loss
    c = _label_weights(result, labels, integer=integer, class_weights=class_weights)
    denominator = _times(u, c).sum()
    if not denominator:
        return np.zeros_like(u)
    return loss / denominator - losses.sum() * c / denominator**2


def random_case(n: int, v: int, *, integer: bool, seed=0, scale=3.0):
    """``(logits, labels)`` in float64: normal logits of standard deviation ``scale`` and integer
    labels ``[n]``, or peaked probability labels ``[n, v]``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, v)) * scale
    if integer:
        return logits, rng.integers(0, v, n)
    raw = rng.random((n, v)) ** 4
    return logits, raw / raw.sum(1, keepdims=True)


def confident_logits(
    num_classes: int, margins, spreads, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``[len(margins) * len(spreads), V]`` float64 logits, margin by margin, and their integer
    labels: the label's logit ``margin`` above the runner-up at 0 (a confident prediction),
    the others ``-|normal(0, spread)|`` below it (flat to peaked), the label at a random
    position."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for margin in margins:
        for spread in spreads:
            others = -np.abs(rng.normal(0.0, spread, num_classes - 1))
            others -= others.max()
            z = np.concatenate([[float(margin)], others])
            order = rng.permutation(num_classes)
            rows.append(z[order])
            labels.append(int(np.flatnonzero(order == 0)[0]))
    return np.stack(rows), np.asarray(labels, np.int32)


def ordered(x: np.ndarray, dtype) -> np.ndarray:
    """The values of ``dtype`` (16 or 32 bits) as integers in their order, so that a difference
    counts units in the last place."""
    size = np.dtype(dtype).itemsize
    bits = np.asarray(x, dtype).view({2: np.int16, 4: np.int32}[size]).astype(np.int64)
    magnitude = bits & (2 ** (8 * size - 1) - 1)  # sign and magnitude: -0 is 0
    return np.where(bits < 0, -magnitude, magnitude)


def ulps(got: np.ndarray, exact: np.ndarray, dtype) -> np.ndarray:
    """How many representable ``dtype`` values lie between ``got`` and float64 ``exact``
    rounded to ``dtype``; 0 and -0 are one value."""
    rounded = np.asarray(exact, np.float64).astype(dtype)
    return np.abs(ordered(np.asarray(got).astype(dtype), dtype) - ordered(rounded, dtype))


@dataclasses.dataclass
class Aux:
    """``return_aux``'s values per example, and the gradient of ``sum_i (c_lse lse + c_argmax
    max_prob + c_entropy entropy + c_target target_logprob)_i`` for the given coefficients."""

    lse: np.ndarray  # [N]
    argmax: np.ndarray  # [N] int, -1 where nothing counts or no finite valid logit
    max_prob: np.ndarray
    entropy: np.ndarray
    target_logprob: np.ndarray | None
    dlogits: np.ndarray  # [N, V]
    dtemperature: float


def monitoring(
    logits,
    labels,
    *,
    integer: bool,
    where=None,
    logit_softcap=None,
    temperature=1.0,
    ignore_index=None,
    coefficients=None,
) -> Aux:
    """The spec of ``return_aux`` in float64, row by row: ``p = softmax(z')`` over the valid
    classes of finite ``z'``; its gradient with respect to ``z'`` written out (``d lse = p``,
    ``d max_prob = p_a (onehot_a - p)``, ``d entropy = p (E_p[z'] - z')``, ``d target_logprob =
    onehot_t - p``), then the chain rule through the softcap and the temperature.
    ``coefficients`` is a dict of ``[N]`` arrays keyed ``lse``, ``max_prob``, ``entropy``,
    ``target_logprob`` (missing ones are 0). Labels of examples that do not count are not read;
    probability labels are not read at all."""
    u = np.asarray(logits, np.float64)
    n, v = u.shape
    valid = np.ones((n, v), bool) if where is None else np.broadcast_to(np.asarray(where), (n, v))
    temperature = float(temperature)
    coefficients = coefficients or {}

    def coefficient(name):
        return np.asarray(coefficients.get(name, np.zeros(n)), np.float64)

    c_lse, c_mp = coefficient("lse"), coefficient("max_prob")
    c_h, c_t = coefficient("entropy"), coefficient("target_logprob")
    out = Aux(
        np.zeros(n),
        np.full(n, -1),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n) if integer else None,
        np.zeros((n, v)),
        0.0,
    )
    with np.errstate(all="ignore"):
        capped = (
            u
            if logit_softcap is None
            else np.where(np.isinf(u), u, logit_softcap * np.tanh(u / logit_softcap))
        )
        dcap = np.ones_like(u) if logit_softcap is None else 1.0 - np.tanh(u / logit_softcap) ** 2
    z_all = np.where(valid, capped / temperature, -np.inf)
    for i in range(n):
        if not valid[i].any():
            continue
        t = int(labels[i]) if integer else None
        if integer and ignore_index is not None and t == ignore_index:
            continue
        z = z_all[i]
        finite = z > -np.inf
        if not finite.any():
            out.lse[i] = -np.inf
            if integer:
                out.target_logprob[i] = -np.inf if 0 <= t < v else np.nan
            continue
        m = z[finite].max()
        e = np.where(finite, np.exp(np.where(finite, z - m, 0)), 0)
        s = e.sum()
        p = e / s
        lse = m + np.log(s)
        a = int(np.argmax(z))  # the first of the ties
        zf = np.where(finite, z, 0)
        mean = np.sum(p * zf)
        out.lse[i] = lse
        out.argmax[i] = a
        out.max_prob[i] = p[a]
        out.entropy[i] = -np.sum(np.where(finite, p * (zf - lse), 0))
        g = c_lse[i] * p + c_h[i] * p * (mean - zf) - c_mp[i] * p[a] * p
        g[a] += c_mp[i] * p[a]
        if integer:
            if 0 <= t < v:
                out.target_logprob[i] = z[t] - lse
                g = g - c_t[i] * p
                if valid[i, t]:
                    g[t] += c_t[i]
            else:
                out.target_logprob[i] = np.nan
        g = np.where(valid[i], g, 0)
        out.dlogits[i] = g * dcap[i] / temperature
        out.dtemperature -= np.sum(g * zf) / temperature
    return out
