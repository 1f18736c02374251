"""Decomposition math as pure functions on tensors: no modules, no policies, no logging.

Everything runs under ``no_grad``. Exact paths work in float64; the randomized range finder used
for large matrices works in float32 (its result is refined in float64), because on a CPU it is
bound by matrix products that run twice as fast in float32.
"""

import math

import torch

# An exact eigendecomposition of a k x k Gram matrix is cheap below this size; above it, and when the
# wanted rank is a small fraction of k, a randomized range finder is several times faster.
RANDOMIZED_MIN_SIZE = 1024
RANDOMIZED_MAX_FRACTION = 1 / 3
# Range finder accuracy: 3 power iterations with rank/2 extra columns (capped, so that the largest
# kernels stay affordable) keep the error within 0.5-0.9% of the optimal truncation on random kernels
# up to 1024x1024x3x3, 1.4% on 2048x2048x5x5 (benchmarks/RESULTS.md); trained weights, whose spectra
# decay faster, come closer.
POWER_ITERATIONS = 3
MIN_OVERSAMPLING, MAX_OVERSAMPLING = 16, 128
# The randomized path draws from its own seeded generator: the decomposition is reproducible and
# never moves the caller's global RNG state.
RANDOM_SEED = 0


def _gram_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``matrix`` through the eigenvectors of M Mᵀ."""
    gram = matrix @ matrix.T
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(1)


def _randomized_basis(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """Orthonormal basis (m, width) of the dominant column space, by subspace iteration (Halko et al.)."""
    generator = torch.Generator(device=matrix.device).manual_seed(RANDOM_SEED)
    sketch = torch.randn(matrix.shape[1], width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    return basis


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
            basis = _gram_eigenvectors(matrix, rank)
        else:  # tall: work on the small side, then map the right vectors back to the left
            basis = torch.linalg.qr(matrix @ _gram_eigenvectors(matrix.T, rank)).Q
        return basis, basis.T @ matrix
    matrix = matrix.float()
    sketch_basis = _randomized_basis(matrix, width)
    projected = (sketch_basis.T @ matrix).double()
    # Best rank-r subspace inside the sketched one: eigenvectors of the small projected Gram matrix.
    inner = _gram_eigenvectors(projected, rank)
    return sketch_basis.double() @ inner, inner.T @ projected


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


@torch.no_grad()
def spatial_factors(weight: torch.Tensor, rank: int, vertical_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AMCT's spatial decomposition of a (Cout, Cin, kh, kw) kernel into two convolution kernels.

    Vertical first: (rank, Cin, kh, 1) then (Cout, rank, 1, kw); otherwise (rank, Cin, 1, kw) then
    (Cout, rank, kh, 1). One truncated SVD of the unfolding, so the error is the optimal one for
    this structure.
    """
    out_ch, in_ch, kh, kw = weight.shape
    left, right = low_rank_factors(spatial_unfold(weight, vertical_first), rank)
    first_k, last_k = (kh, kw) if vertical_first else (kw, kh)
    first = left.T.reshape(rank, in_ch, first_k)
    last = right.reshape(rank, out_ch, last_k).transpose(0, 1)
    if vertical_first:
        return first.unsqueeze(3), last.unsqueeze(2)
    return first.unsqueeze(2), last.unsqueeze(3)


@torch.no_grad()
def tucker2(
    weight: torch.Tensor, in_rank: int, out_rank: int, max_iter: int = 100, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a (Cout, Cin, kh, kw) kernel over its two channel axes: HOOI started from HOSVD.

    Returns ``core`` (out_rank, in_rank, kh, kw), ``u_out`` (Cout, out_rank) and ``u_in``
    (Cin, in_rank), float64, with ``weight ≈ core ×₀ u_out ×₁ u_in``. Iterates until the relative
    error improves by less than ``tol``, the rule of tensorly's ``partial_tucker``, so both stop at
    the same iterate; ``max_iter=0`` returns the HOSVD.
    """
    kernel = weight.double()
    squared_norm = kernel.square().sum().item()
    u_out = leading_subspace(unfold(kernel, 0), out_rank)
    u_in = leading_subspace(unfold(kernel, 1), in_rank)
    core = torch.einsum("oihw,os,ir->srhw", kernel, u_out, u_in)
    error = _relative_error(squared_norm, core)
    for _ in range(max_iter):
        u_out = leading_subspace(unfold(torch.einsum("oihw,ir->orhw", kernel, u_in), 0), out_rank)
        projected = torch.einsum("oihw,os->sihw", kernel, u_out)
        u_in = leading_subspace(unfold(projected, 1), in_rank)
        core = torch.einsum("sihw,ir->srhw", projected, u_in)
        previous, error = error, _relative_error(squared_norm, core)
        if previous - error < tol:
            break
    return core, u_out, u_in


def _relative_error(squared_norm: float, core: torch.Tensor) -> float:
    """||W - core ×₀ U ×₁ V|| / ||W|| for orthonormal U, V: the core holds the captured energy."""
    if squared_norm == 0:
        return 0.0
    return math.sqrt(max(squared_norm - core.square().sum().item(), 0.0) / squared_norm)


@torch.no_grad()
def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, float64 (through the eigenvalues of the smaller Gram matrix)."""
    matrix = matrix.double()
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    eigenvalues = torch.linalg.eigvalsh(matrix @ matrix.T)
    return eigenvalues.flip(0).clamp_min(0).sqrt()


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
