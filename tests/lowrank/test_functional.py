import pytest
import tensorly
import torch
from tensorly.decomposition import partial_tucker

from lowrank import functional as F
from lowrank import functional_peers as peers
from tests.conftest import relative_error


def optimal_error(matrix, rank):
    values = torch.linalg.svdvals(matrix.double())
    return values[rank:].square().sum().sqrt().item()


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (50, 50)])
def test_low_rank_factors_full_rank_reproduces_matrix(shape):
    matrix = torch.randn(*shape, dtype=torch.float64)
    left, right = F.low_rank_factors(matrix, min(shape))
    assert relative_error(left @ right, matrix) < 1e-12


def test_full_rank_of_a_rank_deficient_matrix_is_exact():
    matrix = torch.randn(30, 5, dtype=torch.float64) @ torch.randn(5, 40, dtype=torch.float64)
    left, right = F.low_rank_factors(matrix, 30)
    assert relative_error(left @ right, matrix) < 1e-10
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


@pytest.mark.parametrize("shape,rank", [((80, 120), 10), ((120, 80), 30), ((1200, 1500), 100), ((1500, 1100), 150)])
def test_truncation_is_optimal(shape, rank):
    # The last two take the randomized path: they must stay within 1% of the optimal error.
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    left, right = F.low_rank_factors(matrix, rank)
    error = (matrix.double() - left @ right).norm().item()
    assert error <= 1.01 * optimal_error(matrix, rank)


def test_factors_are_balanced():
    matrix = torch.randn(50, 70, dtype=torch.float64)
    left, right = F.low_rank_factors(matrix, 10)
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1))


def test_error_falls_as_rank_grows():
    matrix = torch.randn(64, 96, dtype=torch.float64)
    errors = [(matrix - torch.matmul(*F.low_rank_factors(matrix, rank))).norm().item() for rank in (4, 16, 32, 64)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-10


def test_randomized_path_leaves_global_rng_alone():
    matrix = torch.randn(1100, 1200)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = F.low_rank_factors(matrix, 50)
    assert torch.equal(torch.rand(3), expected)
    second = F.low_rank_factors(matrix, 50)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_rank_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="rank must be between 1 and 4"):
        F.low_rank_factors(torch.randn(4, 6), 5)


@pytest.mark.parametrize("vertical_first", [True, False])
def test_spatial_factors_full_rank_reproduce_kernel(vertical_first):
    weight = torch.randn(6, 5, 3, 4, dtype=torch.float64)
    rank = min(F.spatial_unfold(weight, vertical_first).shape)
    first, last = F.spatial_factors(weight, rank, vertical_first)
    assert first.shape == ((rank, 5, 3, 1) if vertical_first else (rank, 5, 1, 4))
    assert last.shape == ((6, rank, 1, 4) if vertical_first else (6, rank, 3, 1))
    rebuilt = torch.einsum("rci,orj->ocij", first.flatten(2), last.flatten(2))
    if not vertical_first:
        rebuilt = torch.einsum("rcj,ori->ocij", first.flatten(2), last.flatten(2))
    assert relative_error(rebuilt, weight) < 1e-12


def tucker_rebuild(core, u_out, u_in):
    return torch.einsum("srhw,os,ir->oihw", core, u_out, u_in)


def test_tucker2_full_rank_reproduces_kernel():
    weight = torch.randn(12, 10, 3, 3, dtype=torch.float64)
    assert relative_error(tucker_rebuild(*F.tucker2(weight, 10, 12)), weight) < 1e-12


def test_tucker2_improves_on_hosvd_and_matches_tensorly():

    weight = torch.randn(32, 24, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = relative_error(tucker_rebuild(*F.tucker2(weight, 10, 12)), weight)
    hosvd = relative_error(tucker_rebuild(*F.tucker2(weight, 10, 12, max_iter=0)), weight)
    tensorly.set_backend("pytorch")
    try:
        (core, factors), _ = partial_tucker(weight, rank=[12, 10], modes=[0, 1], init="svd")
    finally:
        tensorly.set_backend("numpy")
    theirs = relative_error(tucker_rebuild(core, factors[0], factors[1]), weight)
    assert ours < hosvd
    assert ours <= theirs * (1 + 1e-6)


def test_energy_rank():
    values = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert F.energy_rank(values, 0.7) == 1
    assert F.energy_rank(values, 0.9) == 2
    assert F.energy_rank(values, 1.0) == 4


@pytest.mark.parametrize("planted", [3, 12])
def test_evbmf_finds_a_planted_rank(planted):
    generator = torch.Generator().manual_seed(planted)
    signal = torch.randn(200, planted, generator=generator, dtype=torch.float64) @ torch.randn(
        planted, 300, generator=generator, dtype=torch.float64
    )
    matrix = signal + 0.3 * torch.randn(200, 300, generator=generator, dtype=torch.float64)
    assert F.evbmf_rank(F.singular_values(matrix), tuple(matrix.shape)) == planted


@pytest.mark.parametrize("lost", ["duplicated", "zeroed"])
def test_evbmf_finds_a_planted_rank_in_a_matrix_of_lower_rank(lost):
    """A duplicated or zeroed channel gives exact zero singular values, which once gave ranks near 30."""
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(64, 4, generator=generator) @ torch.randn(4, 96, generator=generator)
        matrix += 0.3 * torch.randn(64, 96, generator=generator)
        if lost == "duplicated":
            matrix[1] = matrix[0]
        else:
            matrix[5:9] = 0
        assert F.evbmf_rank(F.singular_values(matrix), tuple(matrix.shape)) == 4


def test_singular_values_match_lapack():
    matrix = torch.randn(30, 20, dtype=torch.float64)
    assert torch.allclose(F.singular_values(matrix), torch.linalg.svdvals(matrix), atol=1e-10)


def test_randomized_path_on_a_rank_deficient_matrix_is_exact():
    # The filter's cut comes from the sketch's Ritz values, here mostly zero: it must stay finite.
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(1200, 40, generator=generator) @ torch.randn(40, 1300, generator=generator)
    left, right = F.low_rank_factors(matrix, 100)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert relative_error(left @ right, matrix) < 1e-5


def low_rank_plus_noise(shape, rank, noise, seed):
    """A kernel with a decaying spectrum, as trained weights have: low rank in both channel modes plus noise."""
    generator = torch.Generator().manual_seed(seed)
    out_ch, in_ch, kh, kw = shape
    core = torch.randn(rank, rank, kh, kw, generator=generator)
    low = torch.einsum(
        "srhw,os,ir->oihw",
        core,
        torch.randn(out_ch, rank, generator=generator),
        torch.randn(in_ch, rank, generator=generator),
    )
    return low / low.norm() + noise * torch.randn(*shape, generator=generator) / torch.tensor(shape).prod().sqrt()


def tensorly_error(weight, in_rank, out_rank):

    tensorly.set_backend("pytorch")
    try:
        (core, factors), _ = partial_tucker(weight, rank=[out_rank, in_rank], modes=[0, 1])
    finally:
        tensorly.set_backend("numpy")
    return relative_error(tucker_rebuild(core.double(), factors[0].double(), factors[1].double()), weight.double())


@pytest.mark.parametrize("noise", [0.3, 0.01, 1e-4])
@pytest.mark.parametrize("ranks", [(24, 32), (6, 8)])
def test_tucker2_on_float32_decaying_spectra_is_no_worse_than_tensorly(noise, ranks):
    # Half ranks with noise 0.01 put the cut among eigenvalues a float32 Gram matrix cannot resolve.
    # With noise 1e-4 the residual (1e-4) is near float32's rounding of the kernel: tensorly's float32
    # error then lands 3e-5 (relative) below exact HOOI's by chance, so it is compared in float64.
    weight = low_rank_plus_noise((64, 48, 3, 3), 8, noise, seed=1)
    in_rank, out_rank = ranks
    ours = relative_error(tucker_rebuild(*F.tucker2(weight, in_rank, out_rank)), weight.double())
    reference = weight.double() if noise < 1e-3 else weight
    assert ours <= tensorly_error(reference, in_rank, out_rank) * (1 + 1e-7)


def test_tucker2_of_a_float32_kernel_at_full_rank_reproduces_it():
    weight = torch.randn(24, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    core, u_out, u_in = F.tucker2(weight, 16, 24)
    assert core.dtype == u_out.dtype == u_in.dtype == torch.float64
    assert relative_error(tucker_rebuild(core, u_out, u_in), weight) < 1e-6


def test_tucker2_is_deterministic():
    weight = low_rank_plus_noise((32, 24, 3, 3), 6, 0.01, seed=2)
    first, second = F.tucker2(weight, 12, 16), F.tucker2(weight, 12, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30])
def test_weights_far_from_one_decompose_as_well_as_near_it(scale):
    """float32 squares of weights over about 1e19 overflow (NaN factors), under 1e-19 underflow."""
    torch.manual_seed(0)
    kernel, matrix = torch.randn(32, 32, 3, 3), torch.randn(600, 600)  # the latter takes the randomized path
    core, u_out, u_in = F.tucker2(kernel, 8, 8)
    scaled_core, scaled_u_out, scaled_u_in = F.tucker2(kernel * scale, 8, 8)
    rebuilt = torch.einsum("rshw,or,is->oihw", scaled_core, scaled_u_out, scaled_u_in)
    expected = relative_error(torch.einsum("rshw,or,is->oihw", core, u_out, u_in), kernel.double())
    assert relative_error(rebuilt, (kernel * scale).double()) == pytest.approx(expected, rel=1e-6)
    left, right = F.low_rank_factors(matrix * scale, 50)
    assert relative_error(left @ right, (matrix * scale).double()) < 1.001 * optimal_error(matrix, 50) / matrix.norm()


def test_tucker2_falls_back_to_float64_where_float32_eigh_fails(monkeypatch):
    # MKL's float32 eigh fails to converge on some whitened kernels (a data-aware decomposition).
    torch.manual_seed(0)
    weight = torch.randn(32, 24, 3, 3)
    expected = peers.signed_tucker2(weight, 8, 6)
    eigh = torch.linalg.eigh

    def failing_in_float32(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    for got, want in zip(peers.signed_tucker2(weight, 8, 6), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
