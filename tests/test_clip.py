"""Clipping search: a range (lo, hi) per (row, group), never worse than not clipping."""

import torch

from awqlib import awq
from awqlib.config import QuantConfig
from awqlib.quant import clamp_groups, fake_quantize


def _setup(tokens=300):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    w[:, ::17] *= 6  # a few large weights per group: clipping pays
    x = torch.randn(tokens, 128, generator=g)
    site = awq._Site(torch.zeros(128), [])
    site.add(x)
    return w, x, site


def _group_err(w, x, clip, qcfg):
    lo, hi = clip
    wq = fake_quantize(clamp_groups(w.view(32, 2, 64), lo, hi).view(32, 128), 4, qcfg.group_size, True)
    e = (wq - w).view(32, 2, 64)
    xg = x.view(-1, 2, 64)
    return torch.einsum("rng,tng->rnt", e, xg).pow(2).sum(-1)  # [rows, groups]


def test_clip_ranges_never_worse_than_unclipped_and_asym_refines_symmetric():
    w, x, site = _setup()
    qcfg = QuantConfig(group_size=64)
    absmax = w.view(32, 2, 64).abs().amax(-1, keepdim=True)
    none = _group_err(w, x, (-absmax, absmax), qcfg)
    sym = awq.search_clip(w, site, qcfg, awq.AWQOptions())
    asym = awq.search_clip(w, site, qcfg, awq.AWQOptions(clip_asym=True))
    e_sym, e_asym = _group_err(w, x, sym, qcfg), _group_err(w, x, asym, qcfg)
    tol = 1e-4 * none.max()
    assert (e_sym <= none + tol).all() and (e_sym < none - tol).any()
    assert (e_asym <= e_sym + tol).all() and (e_asym < e_sym - tol).any()
    assert torch.equal(sym[0], -sym[1]), "AWQ's search is symmetric"
