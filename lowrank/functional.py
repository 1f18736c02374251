"""Decomposition math as pure functions on tensors: no modules, no policies, no logging.

Everything runs under ``no_grad``. Exact paths work in float64; the randomized range finder used
for large matrices and tucker2's iterations on float32 kernels work in float32 (their results are
refined in float64), because on a CPU they are bound by matrix products and ``eigh`` that run about
twice as fast in float32.
"""

import math
from collections.abc import Callable

import torch

# An exact eigendecomposition of a k x k Gram matrix is cheap below this size; above it, and when the
# wanted rank is a small fraction of k, a randomized range finder is several times faster.
RANDOMIZED_MIN_SIZE = 1024
RANDOMIZED_MAX_FRACTION = 1 / 3
# Range finder: a degree-3 Chebyshev filter of M Mᵀ (as many products as 3 power iterations) with
# rank/2 extra columns (capped, so that the largest kernels stay affordable). On random kernels, whose
# flat spectra are the hard case, it keeps the error within 0.1-0.6% of the optimal truncation up to
# 2048x2048x5x5, where 3 plain power iterations left 0.5-1.4% (benchmarks/RESULTS.md).
FILTER_DEGREE = 3
MIN_OVERSAMPLING, MAX_OVERSAMPLING = 16, 128
# The filter damps the spectrum below the Ritz value at this fraction of the sketch's width.
FILTER_CUT_FRACTION = 0.75
# The randomized path draws from its own seeded generator: the decomposition is reproducible and
# never moves the caller's global RNG state.
RANDOM_SEED = 0
# tucker2 forms its Gram matrices in float32 while the wanted eigenvalues are at least this fraction of
# the largest (see _top_eigenvectors).
GRAM_FLOAT32_RESOLUTION = 1e-2
# ... and runs in float64 when its float32 relative error is below this: the residual of a nearly
# low-rank kernel is then within a few orders of float32's rounding of the kernel itself.
FLOAT32_MIN_ERROR = 1e-2
# Eigenvectors mapped from the smaller Gram matrix are divided by their singular values while the
# smallest eigenvalue wanted is at least this fraction of the largest (orthonormalized by QR below it).
MIN_EIGENVALUE_RATIO = 1e-6
# Gram matrices are computed as this many row blocks of their lower triangle, the only part `eigh` and
# `eigvalsh` read: 10 of the 16 block products, about 1.5x faster than the full product (the BLAS
# that PyTorch ships has no syrk behind ``matmul``).
GRAM_BLOCKS = 4
# Singular values below this fraction of the largest come from the tools' own SVDs (see evbmf_values).
EVBMF_SVD_BELOW = 1e-3
# Data-aware fits add this fraction of the mean eigenvalue to an input second moment, as GPTQ dampens its
# Hessian: directions that the calibration samples hardly excite (fewer samples than dimensions, dead
# channels) are fitted as the weights have them instead of arbitrarily, and whitening stays bounded.
DAMPING = 0.01


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """M Mᵀ for ``torch.linalg.eigh``/``eigvalsh``, which read its lower triangle alone: only the blocks
    on and below the diagonal are computed (zeros above them), so it is not for other uses. Pass ``M.T``
    for Mᵀ M."""
    size = matrix.shape[0]
    gram = matrix.new_zeros(size, size)
    step = max(1, -(-size // GRAM_BLOCKS))
    for start in range(0, size, step):
        stop = min(start + step, size)
        torch.mm(matrix[start:stop], matrix[:stop].T, out=gram[start:stop, :stop])
    return gram


def gram_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``matrix`` through the eigenvectors of M Mᵀ."""
    _, vectors = torch.linalg.eigh(_gram(matrix))
    return vectors[:, -rank:].flip(1)


def _filtered_basis(matrix: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (m, width) of the dominant column space of ``matrix`` and ``basisᵀ @ matrix``.

    Randomized range finder (Halko et al.) whose power iterations are replaced by a Chebyshev filter
    (as in Zhou & Saad's filtered subspace iteration): the sketch's Ritz values give a cut ``c``
    below which the spectrum of A = M Mᵀ is damped, and ``T_d(2A/c - 1)`` grows much faster than
    ``A^d`` above it, so that close singular values (flat spectra) separate in as many products.
    The filter is applied as ``d`` shifted steps ``(A - μ I)``, one per root of ``T_d``, each
    followed by a QR; the basis changes between steps leave the filtered range unchanged.
    """
    generator = torch.Generator(device=matrix.device).manual_seed(RANDOM_SEED)
    sketch = torch.randn(matrix.shape[1], width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    transposed = matrix.T @ basis
    ritz = torch.linalg.eigvalsh(_gram(transposed.T))
    cut = ritz[round((1 - FILTER_CUT_FRACTION) * width)].clamp_min(ritz[-1] * 1e-6).item()
    for k in range(FILTER_DEGREE):
        shift = cut * (1 + math.cos((2 * k + 1) * math.pi / (2 * FILTER_DEGREE))) / 2
        basis = torch.linalg.qr(matrix @ transposed - shift * basis).Q
        transposed = matrix.T @ basis
    return basis, transposed.T


@torch.no_grad()
def _truncation(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (m, rank) basis of the best rank-``rank`` column space of ``matrix`` and the
    projection ``basisᵀ @ matrix`` (rank, n), both float64."""
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be between 1 and {min(m, n)} for a {m}x{n} matrix, got {rank}")
    small = min(m, n)
    width = min(rank + max(MIN_OVERSAMPLING, min(rank // 2, MAX_OVERSAMPLING)), small)
    if small < RANDOMIZED_MIN_SIZE or width > RANDOMIZED_MAX_FRACTION * small:
        matrix = matrix.double()
        if m <= n:
            basis = gram_eigenvectors(matrix, rank)
        else:  # tall: work on the small side, then map the right vectors back to the left
            basis = torch.linalg.qr(matrix @ gram_eigenvectors(matrix.T, rank)).Q
        return basis, basis.T @ matrix
    scale = _unit_scale(matrix)
    sketch_basis, projected = _filtered_basis(matrix.float() / scale, width)
    projected = projected.double() * scale
    # Best rank-r subspace inside the sketched one: eigenvectors of the small projected Gram matrix.
    inner = gram_eigenvectors(projected, rank)
    return sketch_basis.double() @ inner, inner.T @ projected


def _unit_scale(tensor: torch.Tensor) -> float:
    """A power of two near the largest magnitude in ``tensor`` (1 for zeros): dividing by it is exact,
    and keeps the float32 products of squares (Gram matrices, filter steps) in range for weights far
    from 1, which would overflow from about 1e19 (NaN factors) and underflow below about 1e-19."""
    peak = tensor.detach().abs().max().item()
    return 2.0 ** math.floor(math.log2(peak)) if 0 < peak < math.inf else 1.0


def leading_subspace(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal (m, rank) float64 basis of the best rank-``rank`` column space of ``matrix``."""
    return _truncation(matrix, rank)[0]


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``left`` (m, rank) and ``right`` (rank, n), float64, with ``left @ right`` the best
    rank-``rank`` approximation of ``matrix``.

    Both factors carry the square root of the singular values (balanced), which keeps the two new
    layers on the same scale for finetuning. At full rank the product reproduces ``matrix`` exactly
    (up to rounding), whatever its conditioning, because ``left`` spans the whole column space.
    """
    basis, right = _truncation(matrix, rank)
    scale = right.norm(dim=1).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return basis * scale, right / scale[:, None]


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: that axis becomes the rows, the others are flattened into columns."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def spatial_unfold(weight: torch.Tensor, vertical_first: bool) -> torch.Tensor:
    """Unfolding of a (Cout, Cin, kh, kw) kernel whose rank-r truncation is the spatial decomposition.

    Vertical first: rows are (Cin, kh), columns (Cout, kw); horizontal first swaps kh and kw.
    """
    out_ch, in_ch, kh, kw = weight.shape
    if vertical_first:
        return weight.permute(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)
    return weight.permute(1, 3, 0, 2).reshape(in_ch * kw, out_ch * kh)


def _balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``left`` (m, r) and ``right`` (r, n) rescaled so that each column of ``left`` and the matching row of
    ``right`` have the same norm (the product is unchanged): the two new layers on the same scale."""
    scale = (right.norm(dim=1) / left.norm(dim=0)).sqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return left * scale, right / scale[:, None]


def dampened(input_moment: torch.Tensor) -> torch.Tensor:
    """An input second moment with DAMPING of its mean eigenvalue (its mean diagonal) added to its
    diagonal, float64."""
    moment = input_moment.double()
    return moment + DAMPING * moment.diagonal().mean() * torch.eye(
        len(moment), dtype=moment.dtype, device=moment.device
    )


def dampened_output(output_moment: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The output second moment W E[x xᵀ] Wᵀ of ``matrix`` W, as if E[x xᵀ] were ``dampened``: the mean
    eigenvalue of E[x xᵀ] is taken as tr(W E[x xᵀ] Wᵀ) / tr(W Wᵀ), exact for isotropic inputs."""
    moment, matrix = output_moment.double(), matrix.double()
    gram = matrix @ matrix.T
    scale = moment.trace() / gram.trace() if gram.trace() > 0 else 0.0
    return moment + DAMPING * scale * gram


@torch.no_grad()
def weighted_factors(
    matrix: torch.Tensor,
    rank: int,
    *,
    input_moment: torch.Tensor | None = None,
    output_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``left`` (m, rank) and ``right`` (rank, n), float64, of the rank-``rank`` matrix that
    minimises the output error E||(W - W_r) x||² of ``matrix`` W, given either the uncentred second
    moment of its inputs x (n, n) or that of its outputs W x (m, m); pass them ``dampened``.

    With E[x xᵀ] = L Lᵀ the problem is the best rank-r approximation of W L, P Pᵀ W L, where P holds
    the leading left singular vectors of W L, the leading eigenvectors of W E[x xᵀ] Wᵀ: W_r = P Pᵀ W,
    with no inverse of E[x xᵀ]. From the input moment, P comes from W L on its smaller side.
    """
    matrix = matrix.double()
    if output_moment is not None:
        _, vectors = torch.linalg.eigh(output_moment.double())
        basis = vectors[:, -rank:].flip(1)
    else:
        basis = leading_subspace(matrix @ square_root(input_moment), rank)
    return _balanced(basis, basis.T @ matrix)


def square_root(moment: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = ``moment`` (symmetric positive semi-definite), float64."""
    values, vectors = torch.linalg.eigh(moment.double())
    return vectors * values.clamp_min(0).sqrt()


@torch.no_grad()
def spatial_factors(
    weight: torch.Tensor, rank: int, vertical_first: bool, input_moment: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AMCT's spatial decomposition of a (Cout, Cin, kh, kw) kernel into two convolution kernels.

    Vertical first: (rank, Cin, kh, 1) then (Cout, rank, 1, kw); otherwise (rank, Cin, 1, kw) then
    (Cout, rank, kh, 1). One truncated SVD of the unfolding, so the error is the optimal one for
    this structure. With ``input_moment``, the uncentred second moment of the first factor's input
    patches (rows of the unfolding: Cin x kh, or Cin x kw), the output error on such inputs is
    minimised instead (``weighted_factors`` of the transposed unfolding, whose inputs the patches are,
    with the moment ``dampened``; patches at different positions of the last factor's kernel are taken
    as uncorrelated).
    """
    out_ch, in_ch, kh, kw = weight.shape
    matrix = spatial_unfold(weight, vertical_first)
    if input_moment is None:
        left, right = low_rank_factors(matrix, rank)
    else:  # the outputs' moment Mᵀ C M is as large as C: one eigendecomposition instead of two
        matrix = matrix.double()
        output_moment = matrix.T @ dampened(input_moment) @ matrix
        transposed_left, transposed_right = weighted_factors(matrix.T, rank, output_moment=output_moment)
        left, right = transposed_right.T, transposed_left.T
    first_k, last_k = (kh, kw) if vertical_first else (kw, kh)
    first = left.T.reshape(rank, in_ch, first_k)
    last = right.reshape(rank, out_ch, last_k).transpose(0, 1)
    if vertical_first:
        return first.unsqueeze(3), last.unsqueeze(2)
    return first.unsqueeze(2), last.unsqueeze(3)


def _top_eigenvectors(matrix: torch.Tensor, rank: int, rows: bool) -> tuple[torch.Tensor, float]:
    """Leading ``rank`` eigenvectors of the Gram matrix of ``matrix`` (M Mᵀ if ``rows``, else Mᵀ M),
    in ascending order, and the sum of their eigenvalues (float64).

    A float32 Gram matrix resolves eigenvalues only down to about 1e-7 of the largest: when the
    wanted ones fall below GRAM_FLOAT32_RESOLUTION of it (decaying spectra), it is formed again in
    float64 from the same float32 entries, which is as accurate as a float32 SVD (and when float32's
    ``eigh`` fails to converge, as it does on some whitened kernels). When the Gram matrix
    is larger than the other side's (a 2048-channel 1x1 conv projected on 256 directions), the
    eigenvectors come from the smaller one, ``M V`` orthonormalized: the same subspace, at a fraction of
    the ``eigh``.
    """
    dtype = matrix.dtype
    tall = matrix if rows else matrix.T  # its left singular vectors are wanted
    small_side = tall.shape[1] < tall.shape[0] and rank <= tall.shape[1]
    gram_of = (lambda m: _gram(m.T)) if small_side else _gram
    try:
        values, vectors = torch.linalg.eigh(gram_of(tall))
        in_float32 = dtype == torch.float32 and values[-rank] >= GRAM_FLOAT32_RESOLUTION * values[-1]
    except torch.linalg.LinAlgError:  # float32 LAPACK fails on some wide-ranging ones (whitened kernels)
        if dtype != torch.float32:
            raise
        in_float32 = False
    if dtype == torch.float32 and not in_float32:
        tall = tall.double()
        values, vectors = torch.linalg.eigh(gram_of(tall))
    vectors, top = vectors[:, -rank:], values[-rank:]
    if small_side:  # M v / sigma: orthonormal, unless a sigma is too small to divide by
        mapped = tall @ vectors
        well_scaled = top[0] > top[-1] * MIN_EIGENVALUE_RATIO
        vectors = mapped / top.sqrt() if well_scaled else torch.linalg.qr(mapped).Q
    return vectors.to(dtype), top.double().sum().item()


def _hooi(
    weight: torch.Tensor, in_rank: int, out_rank: int, max_iter: int, tol: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """HOOI from HOSVD in ``dtype``: the factors, the last relative error (see tucker2) and the kernel
    in ``dtype`` and (o, kh, kw, i) layout, all for the core."""
    out_ch, in_ch = weight.shape[:2]
    # An (o, hw, i) layout makes both mode products plain matrix products on views, with no copies.
    kernel = weight.to(dtype).permute(0, 2, 3, 1).contiguous()
    by_row, by_col = kernel.reshape(-1, in_ch), kernel.reshape(out_ch, -1)
    squared_norm = kernel.square().sum(dtype=torch.float64).item()
    u_in, _ = _top_eigenvectors(by_row, in_rank, rows=False)
    # HOOI's first step recomputes u_out from u_in, so the HOSVD's u_out is only needed on its own.
    u_out = _top_eigenvectors(by_col, out_rank, rows=True)[0] if max_iter == 0 else None
    errors = [math.inf]
    for step in range(max_iter):
        projected = (by_row @ u_in).reshape(out_ch, -1)  # kernel ×₁ u_inᵀ as (o, hw·r)
        u_out, _ = _top_eigenvectors(projected, out_rank, rows=True)
        projected = (u_out.T @ by_col).reshape(-1, in_ch)  # kernel ×₀ u_outᵀ as (s·hw, i)
        u_in, energy = _top_eigenvectors(projected, in_rank, rows=False)
        errors.append(_relative_error(squared_norm, energy))
        if step >= 2 and abs(errors[-2] - errors[-1]) < tol:
            break
    return u_out, u_in, errors[-1], kernel


@torch.no_grad()
def tucker2(
    weight: torch.Tensor, in_rank: int, out_rank: int, max_iter: int = 100, tol: float = 1e-4, refine: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a (Cout, Cin, kh, kw) kernel over its two channel axes: HOOI started from HOSVD.

    Returns ``core`` (out_rank, in_rank, kh, kw), ``u_out`` (Cout, out_rank) and ``u_in``
    (Cin, in_rank), float64, with ``weight ≈ core ×₀ u_out ×₁ u_in``. The iterates are those of
    tensorly's ``partial_tucker``: each HOOI step takes the leading eigenvectors of the Gram matrix
    of the kernel projected on the other factor. It stops by tensorly's rule too (after at least
    three steps, once the relative error improves by less than ``tol``), so the error is no worse
    than tensorly's; ``max_iter=0`` returns the HOSVD. The error is read off the eigenvalues (the
    captured energy), so no step rebuilds the kernel.

    Iterates in float32 unless ``weight`` is float64, as tensorly does on a float32 kernel (the
    products and ``eigh`` run about twice as fast), and again in float64 when the error comes out
    below FLOAT32_MIN_ERROR, where float32 rounding is a sizeable part of the residual (unless not
    ``refine``: msModelSlim iterates in float32 alone, and so does ``signed_tucker2``). The factors
    are orthonormalized and the core computed in the iterations' dtype, then returned in float64.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale = _unit_scale(weight)
    weight = weight.to(dtype) / scale
    u_out, u_in, error, kernel = _hooi(weight, in_rank, out_rank, max_iter, tol, dtype)
    if refine and dtype == torch.float32 and error < FLOAT32_MIN_ERROR:
        u_out, u_in, _, kernel = _hooi(weight, in_rank, out_rank, max_iter, tol, torch.float64)
    # The core is computed in the iterations' dtype: float32 rounding (about 1e-7 of ||W||) is
    # negligible next to an error of FLOAT32_MIN_ERROR or more.
    u_out, u_in = torch.linalg.qr(u_out).Q, torch.linalg.qr(u_in).Q
    out_ch, in_ch, kh, kw = weight.shape
    core = (u_out.T @ kernel.reshape(out_ch, -1)).reshape(-1, in_ch) @ u_in
    core = core.reshape(out_rank, kh, kw, in_rank).permute(0, 3, 1, 2)
    return core.double() * scale, u_out.double(), u_in.double()


@torch.no_grad()
def whitened_tucker2(
    weight: torch.Tensor, input_moment: torch.Tensor, in_rank: int, out_rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tucker2`` fitted to the output error on inputs whose channels have the uncentred second moment
    ``input_moment`` (Cin x Cin; the positions of a kernel's window taken as uncorrelated).

    With the ``dampened`` moment U S Uᵀ and L = U S^½, the weighted problem is the plain Tucker-2 of
    the kernel whose input mode is multiplied by L; its input factor is mapped back by U S^-½ (the
    damping keeps it bounded where the calibration data hardly excite a direction). Returns ``core``,
    ``u_out`` and ``u_in`` as ``tucker2`` (``u_in`` no longer orthonormal), float64.
    """
    if not input_moment.diagonal().max() > 0:  # no input ever reached the layer
        return tucker2(weight, in_rank, out_rank)
    values, vectors = torch.linalg.eigh(dampened(input_moment))
    root = values.clamp_min(0).sqrt()
    whitened = torch.einsum("oi...,ij->oj...", weight.double(), vectors * root)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    core, u_out, u_in = tucker2(whitened.to(dtype), in_rank, out_rank)
    return core, u_out, vectors @ (u_in / root[:, None])


def _relative_error(squared_norm: float, energy: float) -> float:
    """||W - core ×₀ U ×₁ V|| / ||W|| for orthonormal U, V, whose core holds ``energy`` = ||core||²."""
    if squared_norm == 0:
        return 0.0
    return math.sqrt(max(squared_norm - energy, 0.0) / squared_norm)


@torch.no_grad()
def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, float64 (through the eigenvalues of the smaller Gram matrix)."""
    matrix = matrix.double()
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    eigenvalues = torch.linalg.eigvalsh(_gram(matrix))
    return eigenvalues.flip(0).clamp_min(0).sqrt()


def evbmf_values(matrix: torch.Tensor, svd: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The singular values EVBMF reads (descending, float64): ``singular_values``, several times faster
    than an SVD and closer to the exact values than a float32 one, unless the smallest fall below
    EVBMF_SVD_BELOW of the largest. There a tool's own SVD (``svd``) gives them: its rounding is a
    sizeable part of such values, EVBMF's search bounds read them, and a Gram matrix's eigenvalues
    would round to zero (which makes every noise variance's free energy infinite)."""
    values = singular_values(matrix)
    if values[-1] >= EVBMF_SVD_BELOW * values[0]:
        return values
    return svd(matrix).double()


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep ``energy`` of the squared spectrum."""
    squares = values.double().square()
    total = squares.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1, len(values))


def _evbmf_free_energy(
    sigma2: torch.Tensor, values: torch.Tensor, rows: int, cols: int, x_bound: float
) -> torch.Tensor:
    """EVBMF free energy as a function of the noise variance, for a grid of ``sigma2`` values."""
    alpha = rows / cols
    x = values.square()[None, :] / (cols * sigma2[:, None])
    signal = x > x_bound
    safe_x = torch.where(signal, x, torch.full_like(x, x_bound + 1))
    shifted = safe_x - (1 + alpha)
    tau = 0.5 * (shifted + torch.sqrt((shifted.square() - 4 * alpha).clamp_min(0)))
    noise_term = torch.where(signal, torch.zeros_like(x), x - torch.log(x))
    signal_term = torch.where(
        signal, safe_x - tau + torch.log((tau + 1) / safe_x) + alpha * torch.log(tau / alpha + 1), torch.zeros_like(x)
    )
    return (noise_term + signal_term).sum(1) + (rows - len(values)) * torch.log(sigma2)


def evbmf_rank(values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Rank estimated by empirical variational Bayesian matrix factorisation (Nakajima et al., JMLR 2013).

    ``values`` are all singular values of a matrix of ``shape``. The noise variance is the minimiser
    of the EVB free energy (searched on a log grid, then refined); the rank is the number of
    singular values above the EVB threshold it implies.
    """
    rows, cols = sorted(shape)
    values = values.double()[:rows]
    if rows < 2 or values[0] == 0:
        return 1
    # Exact zeros (a duplicated or zeroed channel; singular_values clamps the Gram matrix's rounding
    # below zero to 0) make the free energy's log diverge at every noise variance, and the search end at
    # its lower bound, with a rank near rows / (1 + alpha): they count as values at rounding level.
    values = values.clamp_min(values[0].item() * torch.finfo(torch.float64).eps ** 0.5)
    alpha = rows / cols
    tau_bound = 2.5129 * math.sqrt(alpha)
    x_bound = (1 + tau_bound) * (1 + alpha / tau_bound)
    squares = values.square()
    upper = squares.sum() / (rows * cols)
    tail_start = min(max(math.ceil(rows / (1 + alpha)) - 1, 1), rows - 1)
    lower = max(squares[tail_start] / (cols * x_bound), squares[tail_start:].mean() / cols, upper * 1e-12)
    low, high = math.log(lower), math.log(upper)
    for _ in range(3):  # coarse grid, then two refinements around the best point
        grid = torch.linspace(low, high, 257, dtype=torch.float64)
        best = int(torch.argmin(_evbmf_free_energy(grid.exp(), values, rows, cols, x_bound)))
        step = (high - low) / 256
        low, high = grid[max(best - 1, 0)].item(), grid[min(best + 1, 256)].item()
        if step == 0:
            break
    sigma2 = math.exp(grid[best].item())
    threshold = math.sqrt(cols * sigma2 * x_bound)
    return max(int((values > threshold).sum()), 1)
