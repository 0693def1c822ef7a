"""Newton-Schulz orthogonalization of many matrices at once, optionally split across ranks.

The iteration itself is the reference package's ``muon.zeropower_via_newtonschulz5``
(Jordan et al. 2024: quintic, coefficients 3.4445, -4.7750, 2.0315, bf16). It accepts a
batch ``(n, A, B)``, and a batch gives bitwise the same result as a loop over its
matrices (tests/test_optimizers_muon.py checks this), so on GPUs same-shape matrices are
stacked into one call: fewer, larger matmuls. Tall matrices are transposed first (the
iteration works on the wide orientation anyway), so an MLP's ``(4d, d)`` and ``(d, 4d)``
weights share one batch. On CPUs each matrix runs alone (bf16 ``bmm`` runs at about half the
speed of ``mm`` there), laid out contiguous as a stack would (same bits), and the iteration
writes into buffers made once per matrix (:func:`_in_place`, bitwise the reference's ops).

``matmul="addmm"`` is torch.optim.Muon's form of the bf16 iteration (:func:`_addmm_form`,
bitwise ``torch.optim._muon._zeropower_via_newtonschulz``): the scalings folded into ``addmm``,
one rounding where the muon package's form has two, and no bf16 elementwise pass (slow on
CPUs); ``python -m scripts.bench muon-step muon-step-addmm`` times both forms.

bf16 products can be computed two ways (``matmul``): ``"bf16"`` runs the reference function
itself, bf16 GEMMs, bitwise; ``"fp32"`` runs the same op sequence with every product taken as
an fp32 GEMM of the same bf16 operands, rounded back to bf16. That is what a bf16 GEMM
computes (fp32 accumulation, bf16 output), so it differs from the reference only in
accumulation order (~1% relative after five steps, a third of the gap between the reference
and torch.optim.Muon's addmm form), but on CPUs without bf16 units (no AVX512-BF16 / AMX)
it is faster (``python -m scripts.bench muon-step``: the muon-step row of docs/benchmarks.md).
``"auto"`` takes ``"bf16"`` on GPUs with bf16 units (NVIDIA sm_80+, ROCm) and bf16-capable
CPUs, else ``"fp32"`` (:func:`bf16_units` is the decision).

Under ``torch.distributed`` each rank orthogonalizes only the matrices it owns (a
deterministic greedy split by flop count) and the bf16 results are all-gathered, so every
rank ends with every update, bitwise equal to a single-process computation.

Coefficients (``coefficients``): ``"quintic"`` (the default above: one (a, b, c) for every
iteration) or ``"polar_express"``: Polar Express (Amsel, Persson, Musco & Gower 2025, "The Polar
Express: Optimal Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv
2505.16932, Algorithm 1), one minimax-optimal odd quintic per iteration. The table is the paper's
construction for 5 iterations with safety factor 1.02, as published in modded-nanogpt's
``train_gpt.py`` and karpathy/nanochat ``nanochat/optim.py`` (``polar_express_coeffs``,
"num_iters=5, safety_factor=2e-2, cushion=2"); the input is divided by ``1.02 * ||X||_F`` (the
safety factor in the normalization, as in modded-nanogpt), so the spectrum starts inside the
interval the polynomials were fitted on, rounding included.
Iterations beyond the fifth reuse the last triple (the paper's ``repeat(coeffs_list[-1])``).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from muon import zeropower_via_newtonschulz5

__all__ = ["as_matrix", "orthogonalize", "orthogonalize_many", "distributed_world",
           "NS_MATMULS", "NS_COEFFICIENTS", "coefficient_schedule", "check_coefficients"]

NS_MATMULS = ("auto", "bf16", "fp32", "addmm")
_ABC = (3.4445, -4.7750, 2.0315)
# Polar Express, 5 iterations, safety factor 1.02 (see the module doc for the source)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
NS_COEFFICIENTS = ("quintic", "polar_express")


def check_coefficients(name: str) -> str:
    """``name`` if it is a known coefficient table, else a ValueError naming the choices."""
    if name not in NS_COEFFICIENTS:
        raise ValueError(f"ns_coefficients={name!r} is not a Newton-Schulz coefficient table: "
                         f"choose one of {NS_COEFFICIENTS} (quintic: Jordan et al. 2024; "
                         "polar_express: Amsel et al. 2025, arXiv 2505.16932)")
    return name


def coefficient_schedule(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` iterations for table ``name``."""
    check_coefficients(name)
    if name == "quintic":
        return [_ABC] * steps
    return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """2D view of a weight: conv filters ``(out, in, kh, kw)`` become ``(out, in*kh*kw)``."""
    if t.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(t.shape)}: put "
                         "vectors (gains, biases) in a group with use_muon=False")
    return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  matmul: str = "auto", coefficients: str = "quintic") -> torch.Tensor:
    """NS_steps(g) ~ U S' V^T with S' in about [0.68, 1.21] (bf16: the reference iteration);
    ``coefficients="polar_express"`` runs the Polar Express table instead (see module doc)."""
    return _ns(as_matrix(g), steps, dtype, matmul, check_coefficients(coefficients))


def bf16_units(device_type: str, cuda_capability: tuple[int, int] | None = None,
               hip: bool = False, cpu_bf16: bool = False) -> bool:
    """The ``ns_matmul="auto"`` decision, from device facts alone: bf16 products where bf16
    GEMMs run on bf16 units. NVIDIA from compute capability 8.0 (A100, H100, RTX 30xx on;
    V100/T4 emulate bf16 slower than fp32 GEMMs of the same operands), ROCm GPUs (bf16 on
    MI100 on), CPUs with AVX512-BF16 or AMX; other accelerators (MPS, XPU) take bf16."""
    if device_type == "cpu":
        return cpu_bf16
    if device_type == "cuda" and not hip:
        return cuda_capability is None or tuple(cuda_capability) >= (8, 0)
    return True


def native_bf16_gemm(device: torch.device) -> bool:
    """:func:`bf16_units` for ``device`` on this machine."""
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return bf16_units("cpu", cpu_bf16=any(getattr(torch.cpu, f, lambda: False)() for f in probes))
    if device.type == "cuda":
        return bf16_units("cuda", torch.cuda.get_device_capability(device),
                          hip=torch.version.hip is not None)
    return bf16_units(device.type)


def _resolve(matmul: str, device: torch.device) -> str:
    if matmul not in NS_MATMULS:
        raise ValueError(f"ns matmul={matmul!r} is not one of {NS_MATMULS}")
    if matmul == "auto":
        return "bf16" if native_bf16_gemm(device) else "fp32"
    return matmul


def _bf16_via_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x.float(), y.float()).bfloat16()


def _quintic(x: torch.Tensor, steps: int, mm, coefficients: str = "quintic") -> torch.Tensor:
    """``muon.zeropower_via_newtonschulz5``'s op sequence on ``x`` (already in the working
    dtype), every product taken by ``mm``; Polar Express changes only the normalization
    (safety factor) and the per-iteration (a, b, c)."""
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    if coefficients == "quintic":
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    else:
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_SAFETY + 1e-7)
    for a, b, c in coefficient_schedule(coefficients, steps):
        A = mm(x, x.mT)
        B = b * A + mm(c * A, A)
        x = a * x + mm(B, x)
    return x.mT if tall else x


def _in_place(x: torch.Tensor, steps: int, coefficients: str = "quintic") -> torch.Tensor:
    """:func:`_quintic` with ``torch.mm`` products on a wide 2-D ``x`` that may be overwritten,
    bitwise: every op writes into one of six buffers made once per call (``out=``), where the
    reference allocates eight fresh tensors per iteration. On CPUs that halves the cost of the
    scalings and sums: a fresh tensor's first touch costs more than the op, and an ``out=``
    op into a separate buffer ran faster than the in-place form for bf16 (torch 2.13, 1 thread).
    Same roundings: ``B = b*A + (c*A) @ A``, ``x = a*x + B @ x``, each op rounded once."""
    scale = x.norm(dim=(-2, -1), keepdim=True)
    x.div_(scale + 1e-7 if coefficients == "quintic" else scale * POLAR_EXPRESS_SAFETY + 1e-7)
    m = x.size(0)
    A, S, P = (x.new_empty(m, m) for _ in range(3))
    BX, aX = torch.empty_like(x), torch.empty_like(x)
    for a, b, c in coefficient_schedule(coefficients, steps):
        torch.mm(x, x.mT, out=A)
        torch.mm(torch.mul(A, c, out=S), A, out=P)
        torch.mm(torch.add(torch.mul(A, b, out=S), P, out=A), x, out=BX)  # A <- B
        torch.add(torch.mul(x, a, out=aX), BX, out=x)
    return x


def _addmm_form(x: torch.Tensor, steps: int, coefficients: str = "quintic") -> torch.Tensor:
    """The bf16 iteration in ``torch.optim.Muon``'s form (``torch.optim._muon.
    _zeropower_via_newtonschulz``, bitwise for the quintic): the scalings are folded into the
    products (``B = addmm(A, A, A, beta=b, alpha=c)``, ``x = addmm(x, B, x, beta=a)``), so each
    rounds once where the muon package's form rounds twice, and no elementwise pass runs on
    CPUs, where bf16 elementwise ops are slow. Polar Express: the same, with the 1.02 safety
    factor in the normalization. A 2-D ``x``; tall ones iterate as a transposed view, as there."""
    X = x.to(torch.bfloat16, copy=True)  # copy: never write the caller's (momentum) tensor
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    norm = X.norm() if coefficients == "quintic" else X.norm() * POLAR_EXPRESS_SAFETY
    X.div_(norm.clamp(min=1e-7))
    for a, b, c in coefficient_schedule(coefficients, steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


def _ns(x: torch.Tensor, steps: int, dtype: torch.dtype, matmul: str = "auto",
        coefficients: str = "quintic", relayout: bool = False) -> torch.Tensor:
    """NS of ``x``; ``relayout``: lay ``x`` out contiguous first, as stacking it into a batch
    does (GEMMs' accumulation order, hence the bits, can depend on the operands' layout)."""
    native = dtype != torch.bfloat16 or _resolve(matmul, x.device) == "bf16"  # torch.mm products
    if native and x.device.type == "cpu" and x.ndim == 2 and x.size(0) <= x.size(1) and (
            relayout or x.is_contiguous()):
        # A contiguous buffer of our own (converted first: a transposing copy of half the
        # bytes), then the iteration runs in place.
        y = x.to(dtype)
        y = y.contiguous() if y.data_ptr() != x.data_ptr() else y.clone(
            memory_format=torch.contiguous_format)
        return _in_place(y, steps, coefficients)
    if dtype == torch.bfloat16 and matmul == "addmm":
        return _addmm_form(x, steps, coefficients)
    if relayout:
        x = x.contiguous()
    if dtype != torch.bfloat16:
        # The same quintic in a wider dtype: closer to the exact iteration than the bf16 reference.
        return _quintic(x.to(dtype), steps, torch.matmul, coefficients)
    if _resolve(matmul, x.device) == "bf16":
        if coefficients == "quintic":
            return zeropower_via_newtonschulz5(x, steps)
        return _quintic(x.bfloat16(), steps, torch.matmul, coefficients)
    return _quintic(x.bfloat16(), steps, _bf16_via_fp32, coefficients)


def distributed_world() -> tuple[int, int]:
    """(global rank, world) of the default process group, (0, 1) when not distributed: the
    owner split uses the global rank, never a node-local one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cost(shape: torch.Size) -> int:
    a, b = shape
    return a * b * min(a, b)  # flops of one NS step, up to a constant


def _owners(shapes: list[torch.Size], world: int) -> list[int]:
    """Greedy longest-processing-time split; identical on every rank (pure function of shapes)."""
    load = [0] * world
    owner = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-_cost(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += _cost(shapes[i])
    return owner


def _batched(mats: list[torch.Tensor], steps: int, dtype: torch.dtype = torch.bfloat16,
             matmul: str = "auto", coefficients: str = "quintic") -> list[torch.Tensor]:
    """NS of each matrix; on GPUs same-shape matrices (after orienting them wide) in one batched
    call, on CPUs one at a time (same bits either way)."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    wide = [m.mT if m.size(-2) > m.size(-1) else m for m in mats]
    for i, m in enumerate(wide):
        # CPU: a batch is slower than its matrices one by one (bf16 bmm runs at about half the
        # speed of mm, and the stacked operands and temporaries fall out of cache).
        one = m.device.type == "cpu" or matmul == "addmm"  # the addmm form is 2-D only
        buckets[(tuple(m.shape), m.device, i if one else -1)].append(i)
    for idx in buckets.values():
        res = (_ns(wide[idx[0]], steps, dtype, matmul, coefficients, relayout=True).unsqueeze(0)
               if len(idx) == 1
               else _ns(torch.stack([wide[i] for i in idx]), steps, dtype, matmul, coefficients))
        for j, i in enumerate(idx):
            out[i] = res[j].mT if wide[i] is not mats[i] else res[j]
    return out  # type: ignore[return-value]


def orthogonalize_many(mats: list[torch.Tensor], steps: int = 5,
                       distributed: bool | None = None, dtype: torch.dtype = torch.bfloat16,
                       matmul: str = "auto", coefficients: str = "quintic") -> list[torch.Tensor]:
    """NS of every 2D tensor in ``mats`` (results in ``dtype``, same order), with coefficient
    table ``coefficients`` (``"quintic"`` or ``"polar_express"``).

    ``distributed=None`` splits the work whenever a process group of size > 1 exists.
    All ranks must call this with matrices of the same shapes in the same order (true
    under DDP, where every rank holds the same parameters and averaged gradients).
    """
    check_coefficients(coefficients)
    rank, world = distributed_world()
    if distributed is False or world == 1 or len(mats) == 0:
        return _batched(mats, steps, dtype, matmul, coefficients)
    owner = _owners([m.shape for m in mats], world)
    mine = [i for i, o in enumerate(owner) if o == rank]
    local = _batched([mats[i] for i in mine], steps, dtype, matmul, coefficients)
    sizes = [sum(mats[i].numel() for i, o in enumerate(owner) if o == r) for r in range(world)]
    dev = mats[0].device
    # Results travel as raw bytes so every backend (gloo has no bf16) moves them bit for bit.
    width = torch.empty((), dtype=dtype).element_size()
    send = torch.zeros(width * max(sizes), dtype=torch.uint8, device=dev)
    if local:
        flat = torch.cat([t.reshape(-1) for t in local]).view(torch.uint8)
        send[:flat.numel()] = flat
    recv = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(recv, send)
    out: list[torch.Tensor | None] = [None] * len(mats)
    offsets = [0] * world
    for i, m in enumerate(mats):
        r, n = owner[i], m.numel()
        out[i] = recv[r][width * offsets[r]:width * (offsets[r] + n)].view(dtype).view(m.shape)
        offsets[r] += n
    return out  # type: ignore[return-value]
