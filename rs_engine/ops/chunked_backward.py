"""The chunked selective scan's backward pass: a reverse scan, states recomputed per group from the saved
chunk states (see :mod:`rs_engine.ops.scan_chunked`)."""

from __future__ import annotations

import torch

from rs_engine.ops.chunked_forward import (
    _LOG2E,
    _a_layout,
    _decays_inputs,
    _effective_delta,
    _group_slices,
    _load,
    _nat_to_tok,
    _Plan,
    _tok_to_nat,
    _token_major,
)


def _scan_backward(
    saved: tuple[torch.Tensor | None, ...],
    softplus: bool,
    chunk_size: int,
    group_elements: int,
    g_out: torch.Tensor | None,
    g_last: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the chunked scan, group by group from the end, with the same machinery reversed.

    The adjoint recurrence is ``gh_t = C_t * gy_t + a_{t+1} * gh_{t+1}`` (seeded by ``g_last``), run with the
    same two passes and chunk-to-chunk step as the forward; the forward states of a group are recomputed
    from the saved chunk states. Then ``d(delta*A) = gh * a_t * h_{t-1}``, ``g(delta*u) = sum_n gh * B``,
    ``gB = sum_d gh * (delta*u)``, ``gC = sum_d h * gy``.
    """
    u, delta, A, B, C, D, z, delta_bias, chunk_states = saved
    assert chunk_states is not None
    n, ng = A.shape[1], B.shape[1]
    plan = _Plan(u, n, ng, chunk_size, group_elements, n_work=4, n_slabs=10)
    b, d, L, T, dpg = plan.b, plan.d, plan.L, plan.T, plan.dpg
    A2 = _a_layout(A * _LOG2E, ng)
    A_l = _a_layout(A, ng)
    Bt, Ct = _token_major(B, plan.Lp), _token_major(C, plan.Lp)
    Bg, Cg = _group_slices(plan, Bt, col=True), _group_slices(plan, Ct, col=True)
    Bbmm, Cbmm = _group_slices(plan, Bt, col=False), _group_slices(plan, Ct, col=False)
    if g_out is None:
        g_out = u.new_zeros(u.shape)
    g_u, g_delta = u.new_empty(u.shape), u.new_empty(u.shape)
    g_z = u.new_empty(u.shape) if z is not None else None
    gA = A.new_zeros(ng, n, dpg)
    gD = u.new_zeros(d) if D is not None else None
    g_bias = u.new_zeros(d) if delta_bias is not None else None
    gBt = u.new_zeros(b, plan.Lp, ng, n)
    gCt = u.new_zeros(b, plan.Lp, ng, n)
    Dc = D[:, None] if D is not None else None
    # adjoint carried into the last token of the current group from the tokens after it
    r = u.new_zeros(b, ng, n, dpg)
    if g_last is not None:
        r = g_last.reshape(b, ng, dpg, n).permute(0, 1, 3, 2).contiguous()
    groups = plan.groups()
    # slabs: 0 raw delta, 1 u, 2 delta*u then y (pre-gate), 3 delta (tok) then d(delta*A)/d(delta) (tok),
    # 4 delta*u (tok) then its native transpose, 5 g_out then g_y, 6 y (tok) then z then g_y (tok),
    # 7 g(delta*u) (tok), 8 g(delta*u) (native), 9 softplus(delta)
    for i in range(len(groups) - 1, -1, -1):
        c0, g, s0, s1 = groups[i]
        v = plan.views(g)
        gT, m = v.gT, s1 - s0
        dn, pre = _effective_delta(v.nat[0], v.nat[9], delta[:, :, s0:s1], delta_bias, softplus)
        un = _load(v.nat[1], u, s0, s1)
        torch.mul(dn, un, out=v.nat[2])
        _nat_to_tok(v, 3, 9 if dn is v.nat[9] else 0)
        _nat_to_tok(v, 4, 2)
        _decays_inputs(v, 3, 4, Bg[i], A2)
        a, w, h = v.big[0], v.big[1], v.big[2]
        al, wl, hl = v.big_t[0], v.big_t[1], v.big_t[2]
        hin = chunk_states[:, c0 : c0 + g]
        torch.addcmul(wl[0], al[0], hin, out=hl[0])
        for t in range(1, T):
            torch.addcmul(wl[t], al[t], hl[t - 1], out=hl[t])
        # gradient w.r.t. the pre-gate output y + D*u, native layout (slab 5)
        go = _load(v.nat[5], g_out, s0, s1)
        if z is not None:
            torch.bmm(Cbmm[i], v.big_rows[2], out=v.tok_rows[6])
            yn = v.nat[2]
            _tok_to_nat(v, 2, 6)
            if Dc is not None:
                yn.addcmul_(un, Dc)
            zs = _load(v.nat[6], z, s0, s1)
            sig = torch.sigmoid(zs)
            dsilu = sig * (1 + zs * (1 - sig))  # d silu(z) / dz
            g_z[:, :, s0:s1] = (go * yn * dsilu)[:, :, :m]
            go.mul_(zs.mul_(sig))  # g_y = g_out * silu(z)
        if gD is not None:
            gD += (go * un).sum((0, 2))
        _nat_to_tok(v, 6, 5)  # g_y token-major
        if needs[4]:  # gC[b, t, grp, n] = sum_dpg h * g_y
            gCt[:, s0 : s0 + gT] = torch.bmm(v.big_rows[2], v.tok_cols[6]).view(b, gT, ng, n)
        # q = a_t * h_{t-1}: the decayed previous state (overwrites w)
        q = w
        torch.mul(a[:, :, 0], hin, out=q[:, :, 0])
        torch.mul(a[:, :, 1:], h[:, :, :-1], out=q[:, :, 1:])
        # adjoint: gh = C * g_y, then the reverse recurrence in place, with the same two passes
        gh, ghl = v.big[3], v.big_t[3]
        torch.mul(Cg[i], v.tok6[6], out=gh)
        s, sl = v.small[1], v.small_k[1]
        Pl = v.small_k[2]
        s.copy_(ghl[T - 1])
        for t in range(T - 2, -1, -1):
            torch.addcmul(ghl[t], al[t + 1], s, out=s)
        s.mul_(al[0])  # what chunk k passes to chunk k-1 when nothing comes from after it
        rin, rl = v.small[0], v.small_k[0]
        for k in range(g - 1, -1, -1):
            rl[k].copy_(r)
            r = torch.addcmul(sl[k], Pl[k], r)
        ghl[T - 1].add_(rin)
        for t in range(T - 2, -1, -1):
            torch.addcmul(ghl[t], al[t + 1], ghl[t + 1], out=ghl[t])
        # g(delta*u) = sum_n gh * B (token-major slab 7) and gB = sum_dpg gh * (delta*u)
        torch.bmm(Bbmm[i], v.big_rows[3], out=v.tok_rows[7])
        if needs[3]:
            gBt[:, s0 : s0 + gT] = torch.bmm(v.big_rows[3], v.tok_cols[4]).view(b, gT, ng, n)
        # M = d loss / d(delta*A) = gh * q
        M = q.mul_(gh)
        tmp = h
        if needs[2]:
            torch.mul(M, v.tok6[3], out=tmp)
            gA += tmp.sum((0, 1, 2))
        torch.mul(M, A_l, out=tmp)
        torch.sum(tmp, dim=4, out=v.tok[3].view(b, v.g, T, ng, dpg))
        gda, gxn = v.nat[4], v.nat[8]
        _tok_to_nat(v, 4, 3)
        _tok_to_nat(v, 8, 7)
        # effective-delta gradient: through the decay and through delta*u; u gradient: delta*u and D paths
        gda.addcmul_(gxn, un)
        gu = gxn.mul_(dn)
        if Dc is not None:
            gu.addcmul_(go, Dc)
        g_u[:, :, s0:s1] = gu[:, :, :m]
        if pre is not None:
            gda.mul_(torch.sigmoid(pre))
        if g_bias is not None:
            g_bias += gda[:, :, :m].sum((0, 2))
        g_delta[:, :, s0:s1] = gda[:, :, :m]
    gA_dn = gA.permute(0, 2, 1).reshape(d, n)
    gB = gBt[:, :L].permute(0, 2, 3, 1)
    gC = gCt[:, :L].permute(0, 2, 3, 1)
    return g_u, g_delta, gA_dn, gB, gC, gD, g_z, g_bias
