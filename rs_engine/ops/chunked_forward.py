"""Work space and per-group steps of the chunked selective scan, and its forward pass (see
:mod:`rs_engine.ops.scan_chunked` for the algorithm)."""

from __future__ import annotations

import math

import torch

_LOG2E = math.log2(math.e)

#: softplus threshold used by mamba-ssm (and F.softplus): above it softplus(x) == x.
_SOFTPLUS_THRESHOLD = 20.0


class _Plan:
    """Shapes, chunk/group sizes and reusable scratch for one chunked scan call.

    Work tensors of a group are token-major with ``dim`` innermost -- ``(batch, G, T, ngroups, dstate,
    dim // ngroups)`` -- so every per-position op is a long contiguous vector op and the reduction over
    ``dstate`` with ``C`` is one batched matrix product. Inputs and outputs are ``(batch, dim, L)``; a group's
    slab is copied to a contiguous scratch and transposed with PyTorch's blocked 2-D transpose copy.
    Scratch is allocated once per call and reused by every group: fresh large allocations page-fault, and
    creating views costs microseconds each, so the views of a group are built once per group size.
    """

    def __init__(
        self,
        u: torch.Tensor,
        dstate: int,
        ngroups: int,
        chunk_size: int,
        group_elements: int,
        n_work: int,
        n_slabs: int,
    ) -> None:
        self.b, self.d, self.L = u.shape
        self.n, self.ng = dstate, ngroups
        self.dpg = self.d // ngroups
        self.T = chunk_size
        self.nch = -(-self.L // chunk_size)
        self.Lp = self.nch * chunk_size
        per_chunk = self.b * chunk_size * dstate * self.d
        self.G = max(1, min(self.nch, group_elements // max(per_chunk, 1)))
        kw = {"dtype": u.dtype, "device": u.device}
        self.work = [torch.empty(self.G * per_chunk, **kw) for _ in range(n_work)]
        self.slabs = [torch.empty(self.b * self.d * self.G * chunk_size, **kw) for _ in range(n_slabs)]
        self.smalls = [torch.empty(self.b * self.G * dstate * self.d, **kw) for _ in range(4)]
        self._views: dict[int, _Views] = {}

    def groups(self, reverse: bool = False) -> list[tuple[int, int, int, int]]:
        """``(first chunk, chunks in group, first token, end token clipped to L)`` for every group."""
        out = []
        for c0 in range(0, self.nch, self.G):
            g = min(self.G, self.nch - c0)
            out.append((c0, g, c0 * self.T, min(self.L, (c0 + g) * self.T)))
        return out[::-1] if reverse else out

    def views(self, g: int) -> _Views:
        """Views of the scratch for a group of ``g`` chunks (cached)."""
        v = self._views.get(g)
        if v is None:
            v = self._views[g] = _Views(self, g)
        return v


class _Views:
    """Views of a :class:`_Plan`'s scratch for a group of ``g`` chunks.

    ``nat[i]`` / ``tok[i]``: slab ``i`` as (batch, dim, gT) / (batch, gT, dim); ``big[i]``: work tensor ``i``
    as (batch, g, T, ngroups, dstate, dpg) and ``big_t[i]`` its per-position slices; ``small[i]``: per-chunk
    state scratch (batch, g, ngroups, dstate, dpg) and ``small_k[i]`` its per-chunk slices.
    """

    def __init__(self, plan: _Plan, g: int) -> None:
        b, d, T, ng, n, dpg = plan.b, plan.d, plan.T, plan.ng, plan.n, plan.dpg
        self.g = g
        self.gT = gT = g * T
        ns = b * d * gT
        self.nat = [s[:ns].view(b, d, gT) for s in plan.slabs]
        self.tok = [s[:ns].view(b, gT, d) for s in plan.slabs]
        nb = b * g * T * n * d
        self.big = [w[:nb].view(b, g, T, ng, n, dpg) for w in plan.work]
        self.big_t = [x.unbind(2) for x in self.big]
        nsm = b * g * n * d
        self.small = [s[:nsm].view(b, g, ng, n, dpg) for s in plan.smalls]
        self.small_k = [x.unbind(1) for x in self.small]
        # chunk sums of delta, (b, g, ng, 1, dpg), in the last small buffer (P lives in small[2])
        self.psum = plan.smalls[3][: b * g * ng * dpg].view(b, g, ng, 1, dpg)
        self.tok6 = [x.view(b, g, T, ng, 1, dpg) for x in self.tok]  # token-major slabs, broadcast over N
        self.rows = b * gT * ng
        self.tok_rows = [x.view(self.rows, 1, dpg) for x in self.tok]  # bmm outputs / operands
        self.tok_cols = [x.view(self.rows, dpg, 1) for x in self.tok]
        self.big_rows = [x.view(self.rows, n, dpg) for x in self.big]
        # per-batch 2-D operands of the transposes: (dst, src.T) pairs are built from these
        self.nat2 = [[x[i] for i in range(b)] for x in self.nat]
        self.tok2 = [[x[i] for i in range(b)] for x in self.tok]
        self.nat2_t = [[y.t() for y in x] for x in self.nat2]
        self.tok2_t = [[y.t() for y in x] for x in self.tok2]


def _load(dst: torch.Tensor, src: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """Copy tokens ``[s0, s1)`` of ``src`` (batch, dim, L) into ``dst`` (batch, dim, gT); zero the tail."""
    m = s1 - s0
    if m == dst.shape[2]:
        dst.copy_(src[:, :, s0:s1])
    else:
        dst[:, :, :m].copy_(src[:, :, s0:s1])
        dst[:, :, m:].zero_()
    return dst


def _nat_to_tok(v: _Views, dst: int, src: int) -> None:
    """Token-major slab ``dst`` = transpose of native slab ``src`` (PyTorch's blocked 2-D transpose copy)."""
    for d2, s2 in zip(v.tok2[dst], v.nat2_t[src], strict=True):
        d2.copy_(s2)


def _tok_to_nat(v: _Views, dst: int, src: int) -> None:
    """Native slab ``dst`` = transpose of token-major slab ``src``."""
    for d2, s2 in zip(v.nat2[dst], v.tok2_t[src], strict=True):
        d2.copy_(s2)


def _effective_delta(
    raw: torch.Tensor, eff: torch.Tensor, src: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load a delta slab ``src`` (batch, dim, m) with bias and softplus into scratch (batch, dim, gT).

    Returns (delta_eff, pre): ``delta_eff`` is ``raw`` or ``eff`` (softplus output); ``pre`` is the
    pre-softplus value (for the backward) or None. Tokens past ``m`` (padding) get delta 0: decay 1 and no
    input, so the state passes through them unchanged.
    """
    m, gT = src.shape[2], raw.shape[2]
    head = raw if m == gT else raw[:, :, :m]
    if delta_bias is not None:
        torch.add(src, delta_bias[:, None], out=head)  # load and bias in one pass
    else:
        head.copy_(src)
    if m < gT:
        raw[:, :, m:].zero_()
    if not softplus:
        return raw, None
    torch.ops.aten.softplus.out(raw, 1, _SOFTPLUS_THRESHOLD, out=eff)
    if m < gT:
        eff[:, :, m:].zero_()
    return eff, raw


def _decays_inputs(v: _Views, dtk: int, xtk: int, Bg: torch.Tensor, A2: torch.Tensor) -> None:
    """Work 0 = ``a = exp2(delta * A2)``, work 1 = ``w = (delta*u) * B``, small 2 = chunk decays ``P``.

    ``dtk`` / ``xtk``: token-major slabs holding delta and delta*u; ``Bg``: B of the group as
    (batch, g, T, ngroups, dstate, 1); ``A2 = A*log2(e)`` as (ngroups, dstate, dpg).
    ``P[:, k] = exp2(A2 * sum of delta over chunk k)`` is chunk k's total decay.
    """
    d6 = v.tok6[dtk]
    a, w, P = v.big[0], v.big[1], v.small[2]
    torch.mul(d6, A2, out=a)
    torch.exp2(a, out=a)
    torch.mul(v.tok6[xtk], Bg, out=w)
    torch.sum(d6, 2, out=v.psum)
    torch.mul(v.psum, A2, out=P)
    torch.exp2(P, out=P)


def _forward_states(v: _Views, h: torch.Tensor, out: int) -> None:
    """All states of a group into work tensor ``out`` (1 = in place of ``w``), from ``a`` (work 0), ``w``
    (work 1) and ``P`` (small 2).

    ``h``: state entering the group (batch, ngroups, dstate, dpg), overwritten with the state after it.
    small 0 receives each chunk's incoming state, small 1 the chunk end states.
    """
    al, wl, ol = v.big_t[0], v.big_t[1], v.big_t[out]
    e, el = v.small[1], v.small_k[1]
    hin, hl, Pl = v.small[0], v.small_k[0], v.small_k[2]
    T, g = len(al), v.g
    # pass 1: chunk end states from a zero start, all chunks of the group at once
    e.copy_(wl[0])
    for t in range(1, T):
        torch.addcmul(wl[t], al[t], e, out=e)
    # chunk-to-chunk recurrence, the only sequential part
    hl[0].copy_(h)
    for k in range(g - 1):
        torch.addcmul(el[k], Pl[k], hl[k], out=hl[k + 1])
    torch.addcmul(el[g - 1], Pl[g - 1], hl[g - 1], out=h)
    # pass 2: every token's state from the true incoming states
    torch.addcmul(wl[0], al[0], hin, out=ol[0])
    for t in range(1, T):
        torch.addcmul(wl[t], al[t], ol[t - 1], out=ol[t])


def _token_major(X: torch.Tensor, Lp: int) -> torch.Tensor:
    """(batch, G, N, L) -> zero-padded (batch, Lp, G, N) copy."""
    b, ng, n, L = X.shape
    out = X.new_zeros(b, Lp, ng, n)
    out[:, :L] = X.permute(0, 3, 1, 2)
    return out


def _group_slices(plan: _Plan, X: torch.Tensor, col: bool) -> list[torch.Tensor]:
    """Per-group slices of a token-major (batch, Lp, G, N) tensor, in ``plan.groups()`` order.

    ``col``: shaped (batch, g, T, G, N, 1) to broadcast against work tensors; else (rows, 1, N) for bmm.
    """
    out = []
    for _, g, s0, _ in plan.groups():
        sl = X[:, s0 : s0 + g * plan.T]
        if col:
            out.append(sl.view(plan.b, g, plan.T, plan.ng, plan.n, 1))
        else:
            out.append(sl.reshape(plan.b * g * plan.T * plan.ng, 1, plan.n))
    return out


def _a_layout(A: torch.Tensor, ng: int) -> torch.Tensor:
    """(dim, N) -> contiguous (G, N, dim // G), the layout of the work tensors."""
    d, n = A.shape
    return A.reshape(ng, d // ng, n).permute(0, 2, 1).contiguous()


def _state_to_bdn(h: torch.Tensor) -> torch.Tensor:
    """(batch, G, N, dpg) -> (batch, dim, N)."""
    b, ng, n, dpg = h.shape
    return h.permute(0, 1, 3, 2).reshape(b, ng * dpg, n)


def _scan_forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    softplus: bool,
    chunk_size: int,
    group_elements: int,
    save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward of the chunked scan on same-dtype tensors, B and C 4-D. Returns (out, last_state, chunk_states).

    ``chunk_states`` (batch, nchunks, G, N, dpg) holds the state entering every chunk, for the backward.
    """
    n, ng = A.shape[1], B.shape[1]
    plan = _Plan(u, n, ng, chunk_size, group_elements, n_work=2, n_slabs=6)
    b, d, L = plan.b, plan.d, plan.L
    A2 = _a_layout(A * _LOG2E, ng)
    Bg = _group_slices(plan, _token_major(B, plan.Lp), col=True)
    Cg = _group_slices(plan, _token_major(C, plan.Lp), col=False)
    out = u.new_empty(b, d, L)
    h = u.new_zeros(b, ng, n, plan.dpg)
    chunk_states = u.new_empty(b, plan.nch, ng, n, plan.dpg) if save_states else None
    Dc = D[:, None] if D is not None else None
    # slabs: 0 delta (+ bias), 1 silu(z), 2 delta*u then y, 3 delta (token-major) then y, 4 delta*u
    # (token-major), 5 softplus(delta)
    for i, (c0, g, s0, s1) in enumerate(plan.groups()):
        v = plan.views(g)
        m, full = s1 - s0, s1 - s0 == v.gT
        us = u[:, :, s0:s1]
        dn, _ = _effective_delta(v.nat[0], v.nat[5], delta[:, :, s0:s1], delta_bias, softplus)
        xn = v.nat[2]
        torch.mul(dn if full else dn[:, :, :m], us, out=xn if full else xn[:, :, :m])
        if not full:
            xn[:, :, m:].zero_()
        _nat_to_tok(v, 3, 5 if dn is v.nat[5] else 0)
        _nat_to_tok(v, 4, 2)
        _decays_inputs(v, 3, 4, Bg[i], A2)
        _forward_states(v, h, out=1)
        if chunk_states is not None:
            chunk_states[:, c0 : c0 + g] = v.small[0]
        torch.bmm(Cg[i], v.big_rows[1], out=v.tok_rows[3])
        _tok_to_nat(v, 2, 3)
        yn = v.nat[2] if full else v.nat[2][:, :, :m]
        if Dc is not None:
            yn.addcmul_(us, Dc)
        if z is not None:
            sz = v.nat[1] if full else v.nat[1][:, :, :m]
            torch.ops.aten.silu.out(z[:, :, s0:s1], out=sz)
            torch.mul(yn, sz, out=out[:, :, s0:s1])
        else:
            out[:, :, s0:s1] = yn
    return out, _state_to_bdn(h), chunk_states
