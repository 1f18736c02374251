"""AMCT's and msModelSlim's own math (``lowrank.amct``, ``lowrank.msmodelslim``) as pure functions:
reproduced as those tools compute it, quirks included (../shared/peers/SPEC.md), so that their users
get the same model."""

import math

import numpy as np
import scipy.optimize
import torch

from .functional import evbmf_values, gram_eigenvectors, tucker2

AMCT_MODES = ("FCFK", "FCSK", "SCFK", "SCSK")


def amct_mode(out_channels: int, in_channels: int, kh: int, kw: int) -> str:
    """AMCT's orientation: the truncated factor sits on the smaller-channel side (first channel, FC*,
    when out < in) and carries the smaller kernel dimension (first kernel, *FK, when kh <= kw)."""
    return ("FC" if out_channels < in_channels else "SC") + ("FK" if kh <= kw else "SK")


def amct_vertical_first(mode: str) -> bool:
    """Whether the (kh x 1) conv of an AMCT mode comes first: FCSK and SCFK."""
    return mode in ("FCSK", "SCFK")


def amct_matrix(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The (cmin·kmin, cmax·kmax) float64 matrix whose rank-r truncation is AMCT's decomposition: rows
    are the smaller channel side with the smaller kernel axis, columns the larger ones."""
    tensor = weight.detach().double()
    if mode.startswith("FC"):
        tensor = tensor.transpose(0, 1)
    if mode.endswith("SK"):
        tensor = tensor.transpose(2, 3)
    cmax, cmin, kmin, kmax = tensor.shape
    return tensor.permute(1, 2, 0, 3).reshape(cmin * kmin, cmax * kmax)


@torch.no_grad()
def amct_factors(weight: torch.Tensor, rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """AMCT's two kernels (first, last), float64: the exact rank-``rank`` truncation ``P Pᵀ A`` of
    ``amct_matrix``, with the orthonormal ``P`` on the smaller-channel side and ``Pᵀ A`` on the other."""
    matrix = amct_matrix(weight, mode)
    (cmin, cmax), kmin = sorted(weight.shape[:2]), min(weight.shape[2:])
    basis = gram_eigenvectors(matrix, rank)  # exact, float64; rows <= columns for AMCT's candidates
    core = (basis.T @ matrix).reshape(rank, cmax, -1)  # [j, a, q]
    small = basis.reshape(cmin, kmin, rank)  # [b, p, j]
    if mode.startswith("FC"):  # P is the output side: last conv (o, j, p); core is the first (j, i, q)
        first, last = core, small.permute(0, 2, 1)
    else:  # P is the input side: first conv (j, i, p); core is the last (o, j, q)
        first, last = small.permute(2, 0, 1), core.permute(1, 0, 2)
    if amct_vertical_first(mode):
        return first.unsqueeze(3), last.unsqueeze(2)
    return first.unsqueeze(2), last.unsqueeze(3)


def _evb_free_energy(
    sigma2: float, squares: np.ndarray, rows: int, cols: int, x_bound: float, log_terms: int, floor: float
):
    """EVBMF's free energy at noise variance ``sigma2`` (Nakajima et al. 2013), as AMCT and msModelSlim
    write it: ``log_terms`` extra ``ln sigma2`` terms and ``cols * sigma2`` divided by no less than
    ``floor`` (msModelSlim's rows - number of values, and its 1e-6 guard)."""
    alpha = rows / cols
    x = squares / max(cols * sigma2, floor)
    noise, signal = x[x <= x_bound], x[x > x_bound]
    shifted = signal - (1 + alpha)
    tau = 0.5 * (shifted + np.sqrt(shifted**2 - 4 * alpha))
    with np.errstate(divide="ignore"):  # a zero singular value: +inf, as in both tools
        energy = np.sum(noise - np.log(noise))
    energy += np.sum(signal - tau) + np.sum(np.log((tau + 1) / signal)) + alpha * np.sum(np.log(tau / alpha + 1))
    return energy + log_terms * math.log(sigma2)


def _evb_rank(
    values: np.ndarray, rows: int, cols: int, lower: float, upper: float, log_terms: int, floor: float = 0.0
) -> int:
    """Number of singular values above the EVB threshold, with the noise variance that minimises the
    free energy on [lower, upper] by bounded Brent (SciPy's, as both tools use)."""
    alpha = rows / cols
    tau_bound = 2.5129 * math.sqrt(alpha)
    x_bound = (1 + tau_bound) * (1 + alpha / tau_bound)
    squares = values.astype(np.float64) ** 2
    if not (0 <= lower <= upper) or not math.isfinite(upper):
        sigma2 = (lower + upper) / 2
    else:
        found = scipy.optimize.minimize_scalar(
            _evb_free_energy,
            bounds=(lower, upper),
            args=(squares, rows, cols, x_bound, log_terms, floor),
            method="bounded",
            options={"xatol": 1e-5, "maxiter": 500},
        )
        sigma2 = found.x
    threshold = math.sqrt(cols * sigma2 * x_bound)
    return int(np.sum(values > threshold))


def amct_evbmf_rank(values: torch.Tensor, rows: int, cols: int) -> int:
    """AMCT's EVBMF estimate from all singular values of a ``rows x cols`` matrix (rows <= cols): no
    residual term, and the lower bound's mean starting one value before its first term (a quirk)."""
    values = values.double().cpu().numpy()
    alpha = rows / cols
    tau_bound = 2.5129 * math.sqrt(alpha)
    x_bound = (1 + tau_bound) * (1 + alpha / tau_bound)
    tail = min(math.ceil(rows / (1 + alpha)) - 1, rows) - 1
    squares = values**2
    upper = squares.sum() / (rows * cols)
    lower = max(squares[tail + 1] / (cols * x_bound), squares[tail:].mean() / cols)
    return _evb_rank(values, rows, cols, lower, upper, log_terms=0)


def amct_rank(values: torch.Tensor, rows: int, cols: int, min_channels: int) -> tuple[int, int]:
    """AMCT's rank for a layer whose ``amct_matrix`` (``rows x cols``) has singular ``values``, and the
    EVBMF estimate it started from: the estimate clamped to [rows/(d+1), rows/d] (d = 4 from 256
    channels on the smaller side, else 6), rounded to a multiple of 16 (at least 16, never more than 10%
    below), at most ``rows``."""
    estimate = amct_evbmf_rank(values, rows, cols)
    divisor = 4 if min_channels >= 256 else 6
    rank = max(min(estimate, rows // divisor), rows // (divisor + 1))
    rounded = max(16, (rank + 8) // 16 * 16)
    if rounded < 0.9 * rank:
        rounded += 16
    return min(rounded, rows), estimate


def make_divisible(value, divisor: int) -> int:
    """msModelSlim's rounding of a rank: to the nearest multiple of ``divisor`` (halves up), at least one
    divisor, and one more when rounding took off more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def msmodelslim_evbmf_rank(matrix: torch.Tensor) -> int:
    """msModelSlim's EVBMF estimate for a float32 ``matrix`` as given (rows first, never transposed):
    clipped tail index, bounds swapped when inverted, and a ``ln sigma2`` term per missing value when
    rows > columns. (``evbmf_values`` are closer to the exact values than msModelSlim's float32 SVD, so
    the rank is its own.)"""
    rows, cols = matrix.shape
    values = evbmf_values(matrix, _numpy_singular_values).cpu().numpy()
    alpha = rows / max(cols, 1e-6)
    tau_bound = 2.5129 * math.sqrt(alpha)
    x_bound = (1 + tau_bound) * (1 + alpha / max(tau_bound, 1e-6))
    tail = int(np.clip(int(min(math.ceil(rows / max(1 + alpha, 1e-6)) - 1, rows)) - 1, 0, rows - 2))
    squares = values.astype(np.float64) ** 2
    upper = squares.sum() / max(rows * cols, 1e-6)
    lower = max(squares[tail + 1] / max(cols * x_bound, 1e-6), squares[tail + 1 :].mean() / max(cols, 1e-6))
    lower, upper = min(lower, upper), max(lower, upper)
    return _evb_rank(values, rows, cols, lower, upper, log_terms=rows - len(values), floor=1e-6)


def _numpy_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """NumPy's SVD values in the matrix's dtype, as msModelSlim computes them: with the vectors, whose
    LAPACK path gives other values at rounding level than a values-only SVD."""
    return torch.from_numpy(np.linalg.svd(matrix.cpu().numpy(), full_matrices=False)[1])


def msmodelslim_vbmf_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """msModelSlim's ``(out, in)`` VBMF ranks of a weight (at least 1 each), on its float32 values."""
    weight = weight.detach().float().cpu()
    out_rank = msmodelslim_evbmf_rank(weight.reshape(weight.shape[0], -1))
    in_rank = msmodelslim_evbmf_rank(weight.transpose(0, 1).reshape(weight.shape[1], -1))
    return max(out_rank, 1), max(in_rank, 1)


def split_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``left`` (m, rank) and ``right`` (rank, n) from NumPy's thin SVD, each carrying the square root of
    the singular values, as msModelSlim splits a Linear or Embedding weight (LAPACK's signs kept, so
    that the factors are msModelSlim's own)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def _input_basis(second_moment: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors and eigenvalues of an input second-moment matrix, by NumPy's symmetric SVD in float32
    as msModelSlim takes them (the same LAPACK call gives the same signs)."""
    matrix = second_moment.detach().float().cpu().numpy()
    basis, values, _ = np.linalg.svd(matrix, full_matrices=False, hermitian=True)
    return basis, values


def data_aware_split(weight: np.ndarray, second_moment: torch.Tensor, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """msModelSlim's data-aware factors of a Linear weight W (out, in), given its inputs' uncentred
    second moment C (in, in): the rank-``rank`` minimiser of ||(W - W_r) C||_F, as ``left`` (out, rank)
    and ``right`` (rank, in)."""
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    basis, values = _input_basis(second_moment)
    left, right = split_svd((vt * s[:, None]) @ (basis * values[None, :]), rank)
    return u @ left, (right / np.maximum(values, 1e-6)[None, :]) @ basis.T


def _positive_peaks(factor: torch.Tensor) -> torch.Tensor:
    """The signs that make each column's largest-magnitude entry (the first on ties) positive."""
    peaks = factor.abs().argmax(dim=0)
    signs = torch.sign(factor[peaks, torch.arange(factor.shape[1])])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def signed_tucker2(weight: torch.Tensor, out_rank: int, in_rank: int) -> tuple[torch.Tensor, ...]:
    """``tucker2`` with msModelSlim's sign rule (each factor column's largest-magnitude entry positive,
    the core's slices flipped alike): ``core`` (out_rank, in_rank, kh, kw), ``u_out``, ``u_in``, float64."""
    core, u_out, u_in = tucker2(weight, in_rank, out_rank, refine=False)
    # tucker2's factors come from eigh, in ascending order: msModelSlim's SVDs give the leading first.
    core, u_out, u_in = core.flip(0, 1), u_out.flip(1), u_in.flip(1)
    out_signs, in_signs = _positive_peaks(u_out), _positive_peaks(u_in)
    core = core * out_signs[:, None, None, None] * in_signs[None, :, None, None]
    return core, u_out * out_signs, u_in * in_signs


def data_aware_tucker2(
    weight: torch.Tensor, second_moment: torch.Tensor, out_rank: int, in_rank: int
) -> tuple[torch.Tensor, ...]:
    """msModelSlim's data-aware Tucker-2: the kernel's input mode multiplied by ``U_d diag(S_d)`` (the
    eigenvectors and eigenvalues of its inputs' second moment), decomposed, and the input factor mapped
    back by ``U_d diag(1/max(S_d, 1e-6))``. Returns ``core``, ``u_out``, ``u_in`` (no longer
    orthonormal), float64."""
    basis, values = _input_basis(second_moment)
    scaled = torch.from_numpy(basis * values[None, :]).to(weight.device, torch.float32)
    kernel = torch.einsum("oi...,ij->oj...", weight.detach().float(), scaled)
    core, u_out, projected = signed_tucker2(kernel, out_rank, in_rank)
    back = torch.from_numpy(basis / np.maximum(values, 1e-6)[None, :]).to(weight.device, torch.float64)
    return core, u_out, back @ projected
