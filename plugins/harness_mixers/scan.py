"""The selective scan of Mamba v1, with mamba-ssm's ``selective_scan_fn`` signature.

    delta = softplus(delta + delta_bias)            (softplus only if delta_softplus)
    h_t   = exp(delta_t A) h_{t-1} + delta_t B_t u_t
    y_t   = C_t h_t + D u_t,   out = y * SiLU(z)    (z optional)

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L), or (B, G, N, L) where G groups of
D/G channels share one B and C (VMamba's four directions in one call); D, delta_bias (D,).

Dispatch: on CUDA with mamba-ssm importable (``pip install '.[cuda]'``; ``HARNESS_MAMBA_SSM=0``
turns it off), its fused kernel. Everywhere else our :class:`SelectiveScanFn`: on the CPU a
compiled loop (csrc/selective_scan.cpp, built on first use and cached; forward and a
hand-written backward; ``HARNESS_NATIVE_SCAN=0`` turns it off), and otherwise (CUDA without
mamba-ssm, or no compiler) a log-depth parallel scan in PyTorch. Both are stable for any
delta * A <= 0: they multiply decays exp(delta A) <= 1 and never divide by them, which is
where a cumulative-sum rewrite overflows. The forward is the registered op
``harness_mixers::selective_scan`` (:func:`scan_op`), which a FLOP count (harness.flops)
sees and counts with :func:`selective_scan_flop`; on meta tensors it gives shapes only.

The three run at very different speeds, so every call says which one ran
(``mamba-ssm``, ``compiled-cpu`` or ``pytorch``) through :func:`harness.kernels.note`;
records carry it under ``env.kernels.selective_scan``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
import torch.nn.functional as F

from harness import kernels

from . import _native

__all__ = ["selective_scan", "selective_scan_ref", "SelectiveScanFn", "scan_op", "selective_scan_flop",
           "native_available"]

KERNEL = "selective_scan"  # the name under env.kernels


# -- the definition --------------------------------------------------------------------------
def _groups(mat: torch.Tensor, name: str, batch: int, width: int, length: int) -> torch.Tensor:
    """B or C as (B, G, N, L); rejects the input-independent (D, N) form mamba-ssm also takes."""
    if mat.dim() == 3:
        mat = mat.unsqueeze(1)
    if mat.dim() != 4 or mat.shape[0] != batch or mat.shape[-1] != length:
        raise ValueError(f"selective_scan: {name} must be (batch, N, L) or (batch, groups, N, L) with batch "
                         f"{batch} and L {length} (input-dependent B/C only), got {tuple(mat.shape)}")
    if width % mat.shape[1]:
        raise ValueError(f"selective_scan: {name} has {mat.shape[1]} groups, which do not divide D = {width}")
    return mat


def _check(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, D, L), got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    batch, width, length = u.shape
    if A.dim() != 2 or A.shape[0] != width or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (D, N) with D = {width}, got {tuple(A.shape)}")
    B = _groups(B, "B", batch, width, length)
    C = _groups(C, "C", batch, width, length)
    if B.shape[1:3] != C.shape[1:3] or B.shape[2] != A.shape[1]:
        raise ValueError(f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must share groups and "
                         f"N = {A.shape[1]}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (width,):
            raise ValueError(f"selective_scan: {name} must be ({width},), got {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must be {tuple(u.shape)}, got {tuple(z.shape)}")
    return B, C


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The sequential loop over L: the definition the fast paths are tested against."""
    B, C = _check(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    u, delta, A, B, C = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    reps = u.shape[1] // B.shape[1]
    B = B.repeat_interleave(reps, dim=1)  # (batch, D, N, L)
    C = C.repeat_interleave(reps, dim=1)
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None])  # (batch, D, L, N)
    drive = (delta * u).unsqueeze(-1) * B.transpose(-1, -2)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # unbind, not indexing per step: the backward of L index ops would add L full-size zero
    # tensors (quadratic in L); unbind's backward is one stack.
    for a_t, b_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(3)):
        h = a_t * h + b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(dtype)
    return (y, h) if return_last_state else y


# -- the PyTorch path: a log-depth parallel scan, differentiable by autograd ------------------
def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk: int = 256):
    """Hillis-Steele prefix scan of h_t = a_t h_{t-1} + b_t in chunks of ``chunk`` steps.

    Combining (a1, b1) then (a2, b2) gives (a1 a2, a2 b1 + b2): only products of decays <= 1,
    so it cannot overflow. log2(chunk) vectorised steps replace ``chunk`` Python iterations;
    chunks bound the memory autograd keeps. Returns (out, last_state)."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    reps = u.shape[1] // B.shape[1]
    Bt = B.repeat_interleave(reps, dim=1).transpose(-1, -2)  # (batch, D, L, N)
    Ct = C.repeat_interleave(reps, dim=1).transpose(-1, -2)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for s in range(0, u.shape[-1], chunk):
        dl = delta[..., s:s + chunk, None]
        a = torch.exp(dl * A[:, None])
        b = dl * u[..., s:s + chunk, None] * Bt[:, :, s:s + chunk]
        step = 1
        while step < a.shape[2]:
            b = torch.cat([b[:, :, :step], b[:, :, step:] + a[:, :, step:] * b[:, :, :-step]], dim=2)
            a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
            step *= 2
        hs = b + a * h[:, :, None]  # carry the state in from the previous chunk
        h = hs[:, :, -1]
        ys.append((hs * Ct[:, :, s:s + chunk]).sum(-1))
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


# -- the compiled CPU path ---------------------------------------------------------------------
def native_available() -> bool:
    return _native.load() is not None


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="scan")


def _run(fn, ntasks: int, args: list) -> None:
    """Split [0, ntasks) over torch's thread count; ctypes drops the GIL inside each call."""
    nthreads = min(torch.get_num_threads(), ntasks, _pool()._max_workers)
    bounds = [ntasks * i // nthreads for i in range(nthreads + 1)]
    if nthreads == 1:
        fn(*args, 0, ntasks)
        return
    futures = [_pool().submit(fn, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    for f in futures:
        f.result()


def _ptr(t):
    return None if t is None else t.data_ptr()


# Backward splits each group's channels into this many chunks, each summing its own dB/dC
# slice. Fixed (not the thread count) so that gradients are bit-identical on any machine.
_BWD_CHUNKS = 8


def _native_args(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus):
    batch, width, length = u.shape
    return [_ptr(u), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(z), _ptr(delta_bias),
            batch, width, length, A.shape[1], Bt.shape[1], int(delta_softplus)]


def _use_native(*tensors) -> bool:
    ts = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" for t in ts) and ts[0].dtype in (torch.float32, torch.float64)
            and all(t.dtype == ts[0].dtype for t in ts) and native_available())


@torch.library.custom_op("harness_mixers::selective_scan", mutates_args=())
def scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
            count_d_term: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward scan as a registered op (``harness_mixers::selective_scan``), so that PyTorch's
    dispatcher, and a FLOP count listening there, sees one op and its shapes, not the compiled
    loop's ctypes call or the PyTorch path's pieces. ``count_d_term`` changes no output: it
    tells the count to add the skip term (:func:`selective_scan_flop`). Returns (out, last state)."""
    if _use_native(u, delta, A, B, C, D, z, delta_bias):
        kernels.note(KERNEL, "compiled-cpu")
        lib = _native.load()
        sfx = "f32" if u.dtype == torch.float32 else "f64"
        Bt, Ct = B.transpose(-1, -2).contiguous(), C.transpose(-1, -2).contiguous()
        out = torch.empty_like(u)
        last = u.new_empty(u.shape[0], u.shape[1], A.shape[1])
        _run(getattr(lib, f"scan_fwd_{sfx}"), u.shape[0] * u.shape[1],
             _native_args(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus) + [out.data_ptr(), last.data_ptr()])
        return out, last
    kernels.note(KERNEL, "pytorch")
    with torch.no_grad():
        return _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@scan_op.register_fake
def _scan_shapes(u, delta, A, B, C, D, z, delta_bias, delta_softplus, count_d_term):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1])


class SelectiveScanFn(torch.autograd.Function):
    """The scan as one autograd node: the forward is :func:`scan_op`, the backward the compiled
    loop's or autograd through the PyTorch path."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                count_d_term=False):
        u, delta, A, B, C, D, z, delta_bias = (None if t is None else t.contiguous()
                                              for t in (u, delta, A, B, C, D, z, delta_bias))
        ctx.delta_softplus = delta_softplus
        ctx.native = _use_native(u, delta, A, B, C, D, z, delta_bias)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        out, last = scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, count_d_term)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        if not ctx.native:  # recompute the PyTorch path with autograd and differentiate it
            inputs = [t.detach().requires_grad_() if t is not None else None
                      for t in (u, delta, A, B, C, D, z, delta_bias)]
            with torch.enable_grad():
                out, _ = _scan_torch(*inputs, ctx.delta_softplus)
            live = [t for t in inputs if t is not None]
            grads = iter(torch.autograd.grad(out, live, dout))
            return (*(next(grads) if t is not None else None for t in inputs), None, None)
        lib = _native.load()
        sfx = "f32" if u.dtype == torch.float32 else "f64"
        batch, width, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        chunks = min(_BWD_CHUNKS, width // groups)
        Bt, Ct = B.transpose(-1, -2).contiguous(), C.transpose(-1, -2).contiguous()
        dout = dout.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = u.new_empty(batch, width, nstate)
        dD, dbias = u.new_empty(batch, width), u.new_empty(batch, width)
        dB = u.new_empty(batch, groups, chunks, length, nstate)
        dC = torch.empty_like(dB)
        _run(getattr(lib, f"scan_bwd_{sfx}"), batch * groups * chunks,
             _native_args(u, delta, A, Bt, Ct, D, z, delta_bias, ctx.delta_softplus)
             + [dout.data_ptr(), du.data_ptr(), ddelta.data_ptr(), _ptr(dz), dA.data_ptr(), dD.data_ptr(),
                dbias.data_ptr(), dB.data_ptr(), dC.data_ptr(), chunks])
        return (du, ddelta, dA.sum(0), dB.sum(2).transpose(-1, -2), dC.sum(2).transpose(-1, -2),
                dD.sum(0) if D is not None else None, dz, dbias.sum(0) if delta_bias is not None else None,
                None, None)


@lru_cache(maxsize=1)
def _mamba_ssm():
    """mamba-ssm's fused CUDA scan where it imports (it needs its compiled extension)."""
    if os.environ.get("HARNESS_MAMBA_SSM", "1") == "0":
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or its extension failing to load: both mean "not here"
        return None
    return selective_scan_fn


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, count_d_term=False):
    """mamba-ssm's ``selective_scan_fn``: out (B, D, L), and the last state (B, D, N) if asked.

    ``count_d_term``: the same result, but a FLOP count adds B·D·L for the skip term D·u, as
    VMamba's and LaMamba-Diff's ``flops()`` do (``flops_selective_scan_fn(with_D=True)``)."""
    B4, C4 = _check(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and _mamba_ssm() is not None:
        kernels.note(KERNEL, "mamba-ssm")
        return _mamba_ssm()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype = u.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the state recurrence needs float32
        u, delta, A, B4, C4, D, z, delta_bias = (None if t is None else t.float()
                                                 for t in (u, delta, A, B4, C4, D, z, delta_bias))
    out, last = SelectiveScanFn.apply(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus,
                                      count_d_term and D is not None)
    out = out.to(dtype)
    return (out, last) if return_last_state else out


def selective_scan_flop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        count_d_term=False, *, out_shape=None) -> int:
    """FLOP rule for ``harness_mixers::selective_scan`` (shapes in): 9 * B * L * D * N multiply-adds.

    The figure mamba-ssm uses: per state element and step, the decay exp(delta A), the input
    term delta B u, the recurrence and the readout C h. With ``count_d_term``, B * D * L more
    for the skip term D * u: the official LaMamba-Diff/VMamba count (``selective_scan_flop_jit``,
    ``with_D=True``)."""
    batch, width, length = u
    flops = 9 * batch * length * width * A[1]
    return flops + batch * width * length if count_d_term else flops
