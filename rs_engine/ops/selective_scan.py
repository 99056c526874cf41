"""Selective scan with Mamba-1 semantics: mamba-ssm's CUDA kernel where it can run, a chunked PyTorch scan elsewhere.

The scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", eq. 2a-2b and
Algorithm 2), per batch ``b``, channel ``d`` and state ``n``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t
    out = y * silu(z)                                              (when z is given)

Three implementations share that contract (the one of mamba-ssm's
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, real ``A`` only):

* :func:`selective_scan_fn` -- the dispatcher: mamba-ssm's fused kernel when the tensors are on CUDA and
  ``mamba_ssm`` imports, otherwise :func:`selective_scan_chunked`.
* :func:`selective_scan_chunked` -- pure PyTorch, fast on a CPU, differentiable (hand-written backward).
* :func:`selective_scan_ref` -- the slow reference: decays and inputs precomputed for every token, then a
  Python loop over tokens, as mamba-ssm's ``selective_scan_ref``. It runs in whatever floating dtype it is
  given, so tests use it in float64 as ground truth.

How the chunked scan works, and why
-----------------------------------
The sequence is cut into chunks of ``T`` tokens (``chunk_size``) and chunks into groups of ``G`` chunks sized
so that a group's ``(G*T, dstate, dim)`` work tensors stay in the CPU cache. Per group:

1. ``a = exp2(delta * A*log2(e))`` and ``w = delta*u * B`` for every token of the group, each one vectorised
   op over the whole group (``exp2`` is several times faster than ``exp`` in PyTorch's CPU kernels).
2. Pass 1: one ``addcmul`` per position ``t < T`` across all ``G`` chunks at once gives every chunk's end
   state from a zero start.
3. The only sequential part: the chunk-to-chunk recurrence ``h_in[k+1] = P_k * h_in[k] + e_k`` with
   ``P_k = exp2(A*log2(e) * sum(delta over chunk k))``, one small op per chunk.
4. Pass 2: the same per-position recurrence again, started from the true incoming states, writes the states
   of every token; a batched matrix product with ``C`` reduces them over ``dstate`` to ``y``.

The Python loop count is ``2*T`` per group plus one per chunk -- never one per token. All decays are
``exp`` of a non-positive number (for ``delta >= 0`` and ``A <= 0``, Mamba's case), so nothing overflows:
extreme decays underflow to 0 and the state resets, as in the reference. Every state is the same product
and sum as the sequential recurrence, so the result is exact to float32 rounding (relative error ~1e-6).

Alternatives measured on the target CPU (2 cores, AVX-512) and rejected:

* The log-space cumsum form ``h_t = exp(S_t) * (h_0 + cumsum_s(exp(-S_s) * w_s))``, ``S = A * cumsum(delta)``
  (SSD's chunked form, Dao & Gu 2024, "Transformers are SSMs", sec. 6, applied per state): it needs a second
  transcendental pass (``exp(-S)``), ``torch.cumsum`` is slow on CPU (0.2-1.7 G elements/s) so it needs the
  same per-position loop, and ``exp(-S)`` overflows float32 once a chunk's decay exceeds ``e^-88`` -- which
  trained Mamba models reach (``A`` down to -16 or lower, ``delta`` up to several units).
* The separable matrix (SSD "dual") form ``y = (L o (C e^{S}) (B e^{-S})^T) (delta u)``: Mamba-1 has a
  different decay per state ``n``, so the ``T x T`` matrix costs ``T * dstate`` multiply-adds per token and
  channel instead of ``dstate``; with ``dstate = 16`` batched GEMMs of that size lose to the elementwise form.

What bounds it on a CPU (measured on 2 AVX-512 cores at batch 1, dim 512, dstate 16, L 16384, i.e. 134M
state elements; ~150 ms in all): ``L*dim*dstate`` ``exp2`` evaluations at ~6e9/s (~22 ms); five passes over
the states -- decay product, input product, the two recurrence passes, the contraction -- at 8-15e9
elements/s, mostly from the last-level cache (~65 ms); three ``(batch, dim, L)`` transposes to and from
token-major order at ~1.3e9 elements/s, PyTorch's best copy kernel for them (~18 ms); bias/softplus/D/silu
and slab copies (~25 ms); and ~6.4k op dispatches at ~3 us (~20 ms). The per-token loop of the reference is
bound by 16k iterations of three small ops on strided slices of its precomputed tensors. See ``bench/scan.py``.
Many small parallel ops also make the scan sensitive to CPU oversubscription: run next to another busy
multi-threaded process on the same cores, every OpenMP region waits for a descheduled thread.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "has_mamba_ssm_cuda",
    "mamba_ssm_status",
    "scan_backend",
    "selective_scan_chunked",
    "selective_scan_fn",
    "selective_scan_ref",
]

logger = logging.getLogger(__name__)

#: Tokens per chunk of the chunked scan. Shorter chunks mean more sequential chunk-to-chunk steps, longer
#: ones fewer chunks per group (smaller ops); 16 was fastest in ``bench/scan.py`` on the target CPU.
DEFAULT_CHUNK_SIZE = 16

#: Elements per work tensor of a group (``batch * G * T * dstate * dim``): 2**20 float32 = 4 MiB, so the two
#: or four work tensors fit the last-level cache while each op is still large enough to amortise dispatch.
_GROUP_ELEMENTS = 1 << 20

_LOG2E = math.log2(math.e)

#: softplus threshold used by mamba-ssm (and F.softplus): above it softplus(x) == x.
_SOFTPLUS_THRESHOLD = 20.0


# ---------------------------------------------------------------------------------------------------------
# mamba-ssm detection and dispatch
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_mamba_ssm() -> tuple[Callable[..., object] | None, str]:
    """Import mamba-ssm's ``selective_scan_fn`` once; return it (or None) and a one-line status."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception as exc:  # ImportError, or a build whose CUDA extension fails to load (OSError, ...)
        logger.debug("mamba_ssm not usable: %s: %s", type(exc).__name__, exc)
        return None, f"mamba_ssm not importable ({type(exc).__name__}: {exc})"
    return fn, "mamba_ssm imported"


def has_mamba_ssm_cuda() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel can be used: CUDA is available and mamba_ssm imports.

    The import is attempted once, lazily, and cached; mamba_ssm is never required.
    """
    return torch.cuda.is_available() and _load_mamba_ssm()[0] is not None


def mamba_ssm_status() -> str:
    """One line for ``rs-engine doctor``: which selective-scan backend CUDA tensors get, and why."""
    if not torch.cuda.is_available():
        return "selective scan: chunked PyTorch (CUDA not available)"
    fn, status = _load_mamba_ssm()
    if fn is None:
        return f"selective scan: chunked PyTorch on CUDA tensors ({status})"
    return "selective scan: mamba-ssm CUDA kernel for CUDA tensors"


def scan_backend(u: torch.Tensor) -> str:
    """Name the implementation :func:`selective_scan_fn` uses for input ``u``: ``"mamba_ssm"`` or ``"chunked"``.

    mamba-ssm's kernel handles float32/float16/bfloat16 on CUDA; everything else takes the PyTorch path.
    """
    if u.is_cuda and u.dtype in (torch.float32, torch.float16, torch.bfloat16) and has_mamba_ssm_cuda():
        return "mamba_ssm"
    return "chunked"


# ---------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------


def _check_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise ValueError for shapes, dtypes or devices outside the contract of :func:`selective_scan_fn`."""
    if A.is_complex() or B.is_complex() or C.is_complex():
        raise ValueError("selective scan: complex A, B or C is not supported (real Mamba-1 only)")
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (dim={dim}, dstate), got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 3:
            ok = X.shape == (batch, dstate, length)
        elif X.dim() == 4:
            ok = X.shape[0] == batch and X.shape[2:] == (dstate, length) and X.shape[1] >= 1
            ok = ok and dim % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective scan: {name} must be (batch, dstate, L) = ({batch}, {dstate}, {length}) or "
                f"(batch, G, dstate, L) with dim % G == 0, got shape {tuple(X.shape)}"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective scan: B and C have different group counts ({B.shape[1]}, {C.shape[1]})")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (dim,):
            raise ValueError(f"selective scan: {name} must be (dim={dim},), got shape {tuple(X.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(not t.is_floating_point() for t in tensors):
        raise ValueError("selective scan: all tensors must be floating point")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("selective scan: all tensors must be on the same device")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32, as mamba-ssm)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# ---------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Slow reference selective scan: a Python loop over tokens, as mamba-ssm's ``selective_scan_ref``.

    ``exp(delta*A)`` and ``delta*B*u`` are precomputed for all tokens as ``(batch, dim, L, dstate)`` tensors
    (memory grows with ``L*dim*dstate``), then ``h = dA_t*h + dBu_t; y_t = <h, C_t>`` runs token by token.

    Args and returns: as :func:`selective_scan_fn`. Computes in float64 if any input is float64, else in
    float32; ``out`` has ``u``'s dtype, ``last_state`` the compute dtype.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, or complex ``A``.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    if B.dim() == 4:  # (batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim // G)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 3:
        delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(length):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        if C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    out = y if D is None else y + u * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


# ---------------------------------------------------------------------------------------------------------
# chunked scan: work space and per-group steps
# ---------------------------------------------------------------------------------------------------------


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


class _ChunkedScanFn(torch.autograd.Function):
    """Autograd wrapper: chunked forward, chunked reverse-scan backward (states recomputed per group)."""

    @staticmethod
    def forward(
        ctx,
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        save = any(ctx.needs_input_grad)
        out, last, states = _scan_forward(
            u, delta, A, B, C, D, z, delta_bias, softplus, chunk_size, group_elements, save
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.chunk_size, ctx.group_elements = softplus, chunk_size, group_elements
        return out, last

    @staticmethod
    def backward(ctx, g_out: torch.Tensor | None, g_last: torch.Tensor | None):
        grads = _scan_backward(
            ctx.saved_tensors,
            ctx.softplus,
            ctx.chunk_size,
            ctx.group_elements,
            g_out,
            g_last,
            ctx.needs_input_grad,
        )
        g_u, g_delta, gA, gB, gC, gD, g_z, g_bias = grads
        nd = ctx.needs_input_grad
        pick = [g if need else None for g, need in zip((g_u, g_delta, gA, gB, gC, gD, g_z, g_bias), nd[:8])]
        return (*pick, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch selective scan (any device; built for CPUs), differentiable in all tensor inputs.

    Arguments, shapes and result as :func:`selective_scan_fn`, plus ``chunk_size``: tokens per chunk (the
    length of the per-position loops; the chunk-to-chunk recurrence runs ``L / chunk_size`` steps). The
    algorithm and its cost are described in this module's docstring. Computes in float64 if any input is
    float64, else float32; ``out`` has ``u``'s dtype, ``last_state`` the compute dtype.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, complex ``A``, or ``chunk_size < 1``.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective scan: chunk_size must be >= 1, got {chunk_size}")
    dtype_in = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    if B.shape[1] != C.shape[1]:  # one grouped, one not: expand the single group to the other's count
        ng = max(B.shape[1], C.shape[1])
        B, C = B.expand(batch, ng, *B.shape[2:]), C.expand(batch, ng, *C.shape[2:])
    conv = [None if t is None else t.to(cdt) for t in (u, delta, A, B, C, D, z, delta_bias)]
    if length == 0:
        out = u.new_zeros(u.shape)
        last = torch.zeros(batch, dim, A.shape[1], dtype=cdt, device=u.device)
        return (out, last) if return_last_state else out
    out, last = _ChunkedScanFn.apply(*conv, bool(delta_softplus), int(chunk_size), _GROUP_ELEMENTS)
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan with the semantics of mamba-ssm's ``selective_scan_fn`` (real ``A``).

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) step sizes (before ``delta_bias`` and softplus).
        A: (dim, dstate) real state matrix (Mamba uses ``-exp(A_log)``).
        B: (batch, dstate, L), or (batch, G, dstate, L) with channel ``d`` using group ``d // (dim // G)``.
        C: as ``B``.
        D: optional (dim,) skip connection: adds ``D * u``.
        z: optional (batch, dim, L) gate: the output is multiplied by ``silu(z)``.
        delta_bias: optional (dim,) added to ``delta``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last token.

    Returns:
        ``out`` (batch, dim, L) in ``u``'s dtype, or ``(out, last_state)`` with last_state (batch, dim, dstate)
        in the compute dtype (float32, or float64 for float64 inputs).

    Uses mamba-ssm's fused CUDA kernel when the tensors are on CUDA and ``mamba_ssm`` imports (see
    :func:`scan_backend`), else :func:`selective_scan_chunked`.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, or complex ``A``.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    if scan_backend(u) == "mamba_ssm":
        fn = _load_mamba_ssm()[0]
        assert fn is not None
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)  # type: ignore[return-value]
    return selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size=DEFAULT_CHUNK_SIZE
    )
