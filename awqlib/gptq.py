"""GPTQ error feedback (arXiv 2210.17323) on a fixed group grid: small stateless functions.

Columns are quantized left to right; each column's rounding error is spread over the columns not
yet quantized through the inverse Hessian, so that the layer's output error on the calibration
tokens, ``tr(E H E^T)`` with ``H = X^T X``, is what gets minimised instead of the weight error.

The grid is *static*: every group's (scale, zero) is fixed before the first column is quantized,
from the weights handed in (in awqlib: scaled and clipped by AWQ).  GPTQ then only chooses the
codes.  So the result is an ordinary (codes, scale, zero) triple in the AWQ GEMM format, read by
every engine that reads AWQ checkpoints; the dequantized weight it returns lies exactly on that
grid.  Because the grid is fixed first, the columns may be *processed* in any order without
changing the format: ``act_order_permutation`` (GPTQ's act-order, "static groups") quantizes the
columns with the largest Hessian diagonal first, while each column keeps the scale and zero of its
own group in the natural order -- no permuted group index is stored.
"""

from __future__ import annotations

import torch

from .quant import STORE_DTYPE, clamp_groups, compute_qparams, dequantize, quantize


def hessian_factor(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """(U, the damping used, relative to the mean diagonal): U the upper Cholesky factor of
    (H + damp I)^-1 (so H^-1 = U^T U), fp32.

    Dead input channels (diag 0: no calibration token ever reached them) get a unit diagonal, so
    their columns are rounded to nearest and feed no error elsewhere.  ``damp = percdamp * mean
    diag``; where the factorisation still fails (few tokens, ill-conditioned H) the damping grows
    tenfold, up to ``max_tries`` times, and then a clear error is raised: never NaNs.  The damping
    returned is what :func:`damped_hessian` needs to describe the same objective.
    """
    if not torch.isfinite(H).all():
        raise FloatingPointError("the Hessian (X^T X of the calibration activations) holds NaN/inf")
    H = _without_dead_channels(H)
    n = H.shape[0]
    mean_diag = H.diagonal().mean().item()
    damp = percdamp * mean_diag
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, damp / mean_diag
        damp = max(damp * 10, 1e-4 * mean_diag)
    raise FloatingPointError(
        f"the {n}x{n} Hessian could not be factorised even with damping {damp:.3g}: the calibration "
        "activations are degenerate (too few tokens, or overflow); use method='awq' or more calibration data")


def static_qparams(w: torch.Tensor, bits: int, group_size: int, zero_point: bool,
                   clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest (scale, zero) [out, in/g] of ``w`` clamped to each group's ``clip`` = (lo, hi),
    each [out, in/g, 1]."""
    if clip is not None:
        lo, hi = clip
        w = clamp_groups(w.float().view(w.shape[0], lo.shape[1], -1), lo, hi).view(w.shape)
    return compute_qparams(w, bits, group_size, zero_point)


def act_order_permutation(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: input columns by decreasing Hessian diagonal (the channels whose errors
    cost most are quantized first, while the most columns are left to absorb their error).  A
    stable sort, so ties (e.g. dead channels) keep their order."""
    return torch.sort(H.diagonal().float(), descending=True, stable=True).indices


def permute_hessian(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """H with rows and columns in ``perm``'s order (factor this for :func:`gptq_quantize` with perm)."""
    return H[perm[:, None], perm]


def ordered_factor(H: torch.Tensor, percdamp: float,
                   act_order: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(U, perm, damping) for :func:`gptq_quantize`: the inverse-Hessian factor of H in the columns'
    processing order ``perm`` (act-order, else None for the natural one), and the relative damping
    the factorisation needed (:func:`hessian_factor`)."""
    perm = act_order_permutation(H) if act_order else None
    U, damp = hessian_factor(H if perm is None else permute_hessian(H, perm), percdamp)
    return U, perm, damp


def gptq_quantize(w: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int = 4, block_size: int = 128, perm: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ with lazy batch updates on the fixed grid (scale, zero) [out, in/g].

    ``w`` [out, in] (not modified), ``U`` from :func:`hessian_factor`.  Returns the
    dequantized weight [out, in] fp32, exactly ``dequantize(quantize(result, scale, zero))``.
    Rows are independent given H: callers may pass any subset of rows (with their qparams).
    ``perm``: the order the columns are quantized in (:func:`act_order_permutation`); ``U`` must
    then factor :func:`permute_hessian`'s H.  Each column keeps its own group's scale and zero, and
    the result is in the natural column order.
    """
    rows, n = w.shape
    g = n // scale.shape[1]
    maxq = 2**bits - 1
    # Transposed, so that a column is a contiguous row: the per-column steps touch contiguous memory.
    Wt = (w if perm is None else w[:, perm]).t().float().contiguous()  # [in, out], in processing order
    St, Zt = scale.t().float().contiguous(), zero.t().float().contiguous()  # [in/g, out]
    group_of = (torch.arange(n) if perm is None else perm.cpu()).div(g, rounding_mode="floor").tolist()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2]  # a view: updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, z = St[group_of[i1 + i]], Zt[group_of[i1 + i]]
            w_col = W1[i]
            q = (torch.clamp(torch.round(w_col / s) + z, 0, maxq) - z) * s
            err = Err1[i]
            torch.sub(w_col, q, out=err).div_(U1[i, i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
            w_col.copy_(q)
        if i2 < n:  # the block's errors reach the remaining columns in one matmul
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    if perm is None:
        return Wt.t()
    out = torch.empty(rows, n, dtype=Wt.dtype, device=Wt.device)
    out[:, perm.to(Wt.device)] = Wt.t()  # back to the natural column order
    return out


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True,
         clip: tuple[torch.Tensor, torch.Tensor] | None = None, percdamp: float = 0.01,
         block_size: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One linear: ``w`` [out, in], ``H`` = X^T X [in, in] -> (dequantized weight, scale, zero)."""
    scale, zero = static_qparams(w, bits, group_size, zero_point, clip)
    U, perm, _ = ordered_factor(H, percdamp, act_order)
    wq = gptq_quantize(w, U, scale, zero, bits, block_size, perm)
    return wq, scale, zero


def _without_dead_channels(H: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of H in which each dead input channel (diag 0: no calibration token reached it)
    has a unit diagonal and no coupling."""
    H = H.detach().float().clone()
    diag = H.diagonal()
    dead = diag == 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = 1
    return H


def damped_hessian(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + damp I in fp32 (``damp = percdamp * mean diag``), with unit diagonal for dead channels:
    the objective GPTQ's factor minimises, as a matrix, when given the damping
    :func:`hessian_factor` returned with it (more than asked for where the factorisation needed it)."""
    H = _without_dead_channels(H)
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return H


def refit_scales(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 Hd: torch.Tensor) -> torch.Tensor:
    """For fixed codes ``q`` and zeros, the group scales [out, in/g] that minimise each row's output
    error ``(w - (q - z) s) Hd (w - (q - z) s)^T`` (``Hd``: :func:`damped_hessian`), rounded to fp16.

    GPTQ chose the codes on a grid whose scales came from round-to-nearest; with the codes fixed the
    error is quadratic in a row's scales, so the best ones solve a (in/g x in/g) linear system per
    row: ``A s = c`` with ``A[a, b] = v_a Hd_ab v_b^T`` and ``c[a] = v_a (w Hd)_a^T``, ``v_a`` the
    row's ``q - z`` on group a.  Every group of a row is solved jointly, because GPTQ spread each
    group's rounding error over the others.  A row keeps its old scales unless the new ones, rounded
    to fp16, are finite, positive and lower its error (so the result never loses on the
    calibration objective).  ``w``, ``q`` [rows, in]; pass row chunks to bound memory (the
    temporaries hold in/g x in x rows floats).
    """
    rows, n = w.shape
    G = scale.shape[1]
    g = n // G
    V = (q.float().view(rows, G, g) - zero.float().unsqueeze(-1))            # [r, G, g]
    # Y[b, i, r] = sum_{j in group b} Hd[i, j] V[r, b, j]
    Y = torch.bmm(Hd.view(n, G, g).transpose(0, 1), V.permute(1, 2, 0))      # [G, n, r]
    A = torch.einsum("raj,bajr->rab", V, Y.view(G, G, g, rows))               # [r, G, G]
    c = (V * (w.float() @ Hd).view(rows, G, g)).sum(-1)                       # [r, G]
    old = scale.float()
    # A group whose codes all equal its zero contributes nothing: pin its scale to the old one.
    empty = A.diagonal(dim1=1, dim2=2) <= 0
    if empty.any():
        A = A.clone()
        A.diagonal(dim1=1, dim2=2)[empty] = 1.0
        A = A.masked_fill(empty.unsqueeze(1) & ~torch.eye(G, dtype=torch.bool, device=A.device), 0.0)
        A = A.masked_fill(empty.unsqueeze(2) & ~torch.eye(G, dtype=torch.bool, device=A.device), 0.0)
        c = torch.where(empty, old, c)
    L, info = torch.linalg.cholesky_ex(A.double())
    new = torch.cholesky_solve(c.double().unsqueeze(-1), L).squeeze(-1)
    new = new.clamp(min=-65504.0, max=65504.0).to(STORE_DTYPE).float()

    def err(s: torch.Tensor) -> torch.Tensor:  # the row's error, up to the constant w Hd w^T
        s = s.double()
        return torch.einsum("ra,rab,rb->r", s, A.double(), s) - 2 * (s * c.double()).sum(-1)

    ok = (info == 0) & torch.isfinite(new).all(-1) & (new > 0).all(-1) & (err(new) < err(old))
    return torch.where(ok.unsqueeze(-1), new, old)


def refit_rounds(w: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, Hd: torch.Tensor,
                 U: torch.Tensor, rounds: int, bits: int = 4, block_size: int = 128,
                 perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounds`` alternations of :func:`refit_scales` (the scales that fit GPTQ's codes ``wq``
    best) and, between two refits, :func:`gptq_quantize` again on the refitted grid (the codes that
    fit those scales best).  Each step lowers the row's error on the calibration objective or
    keeps it, the refit exactly (it keeps a row whose error would rise), GPTQ up to its greedy
    order.  Returns (dequantized weight, scale), exactly on the grid (scale, zero)."""
    for k in range(rounds):
        if k:
            wq = gptq_quantize(w, U, scale, zero, bits, block_size, perm)
        q = codes_of(wq, scale, zero, bits)
        scale = refit_scales(w, q, scale, zero, Hd)
        wq = dequantize(q, scale, zero)
    return wq, scale


def codes_of(wq: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The integer codes of an on-grid weight, checked to reproduce it exactly."""
    q = quantize(wq, scale, zero, bits)
    if not torch.equal(dequantize(q, scale, zero), wq):
        raise AssertionError("GPTQ produced a weight off its quantization grid")
    return q
