import copy
import functools
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lowrank
from launch.mnist import Net

X = torch.randn(2, 1, 28, 28)


def test_auto_decomposition_logs_the_seed_lines(net, lowrank_log, tmp_path):
    info = tmp_path / "decompose_info.json"
    model, changes = lowrank.auto_decomposition(net, info)
    assert model is net
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    expected = [
        "auto_decomposition start.",
        "Processing: 'conv1'",
        "Processing: 'conv2'",
        f"Decomposition information file is saved to: {info.resolve()}",
        "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
        "auto_decomposition complete.",
    ]
    assert [line for line in lowrank_log if line in expected] == expected


def test_structure_only_replay_then_load_gives_identical_outputs(net, lowrank_log, tmp_path):
    for method in ("spatial", "tucker2", "svd"):
        torch.manual_seed(0)
        decomposed, _ = lowrank.auto_decomposition(Net(), tmp_path / f"{method}.json", method=method)
        lowrank_log.clear()
        rebuilt, changes = lowrank.decompose_network(Net(), tmp_path / f"{method}.json")
        assert lowrank_log == [
            "decompose_network start.",
            f"Decompose: 'conv2' -> {changes['conv2']}",
            "decompose_network complete.",
        ]
        rebuilt.load_state_dict(decomposed.state_dict())  # strict
        assert torch.equal(rebuilt(X), decomposed(X)), method


def test_a_layer_given_as_the_model_is_returned_decomposed_and_left_as_it_is(tmp_path):
    """AMCT's exception: a bare Conv2d is not changed, its decomposition is a new module."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(16, 16, 3, padding=1), torch.randn(2, 16, 8, 8)
    with torch.no_grad():  # of Tucker ranks (4, 4), which rank 4 reproduces
        conv.weight.copy_(
            torch.einsum("oihw,Oo,Ii->OIhw", torch.randn(4, 4, 3, 3), torch.randn(16, 4), torch.randn(16, 4))
        )
    before = copy.deepcopy(conv)
    model, changes = lowrank.auto_decomposition(conv, tmp_path / "info.json", method="tucker2", rank=4, divisor=1)
    assert changes == {"": ["0", "1", "2"]}
    assert isinstance(model, nn.Sequential) and isinstance(conv, nn.Conv2d)
    assert torch.equal(conv(x), before(x))
    torch.testing.assert_close(model(x), conv(x), rtol=1e-4, atol=1e-4)
    rebuilt, replayed = lowrank.decompose_network(nn.Conv2d(16, 16, 3, padding=1), tmp_path / "info.json")
    assert replayed == changes
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))
    linear = nn.Linear(64, 64)
    copied = lowrank.Decompose(linear).from_ratio(0.25, divisor=8).decompose_network()
    assert [type(module) for module in copied] == [nn.Linear, nn.Linear] and isinstance(linear, nn.Linear)


def test_nothing_to_decompose(lowrank_log, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 4))
    _, changes = lowrank.auto_decomposition(model, tmp_path / "amct.json")  # AMCT: no file for no layer
    assert changes == {} and not (tmp_path / "amct.json").exists()
    assert "No tensor meets decomposition conditions. Decomposition information file is not saved." in lowrank_log
    _, changes = lowrank.auto_decomposition(model, tmp_path / "info.json", ratio=0.3)
    assert changes == {}
    assert "No layer meets decomposition conditions." in lowrank_log
    _, changes = lowrank.decompose_network(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 4)), tmp_path / "info.json")
    assert changes == {}


def test_decompose_returns_a_new_model_and_leaves_the_original(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = lowrank.Decompose(net).from_ratio(0.5, divisor=16).decompose_network()
    assert model is not net and isinstance(net.conv2, nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert len(model.conv2) == 3  # tucker2 by default, as msModelSlim


def test_decompose_structure_only_matches_and_loads(net, tmp_path):
    decomposer = lowrank.Decompose(net, method="spatial").from_energy(0.8, divisor=1, min_rank=1)
    with_weights = decomposer.decompose_network()
    structure = decomposer.decompose_network(do_decompose_weight=False)
    assert {k: v.shape for k, v in structure.state_dict().items()} == {
        k: v.shape for k, v in with_weights.state_dict().items()
    }
    assert not torch.equal(structure(X), with_weights(X))
    torch.save(with_weights.state_dict(), tmp_path / "decompose_state_dict.ckpt")
    structure.load_state_dict(torch.load(tmp_path / "decompose_state_dict.ckpt", weights_only=True))
    assert torch.equal(structure(X), with_weights(X))


@pytest.mark.parametrize(
    "choose,conv2,fc",
    [
        # 16 rounds to the default divisor, 64; fc (73728 -> 10) would not get cheaper at 64.
        ("from_fixed", [64, 64, 128], None),
        # lowrank's VBMF rule (min_rank is its keyword): tiny estimates on random weights, conv2 at the
        # divisor, fc at min_rank.
        ("from_vbmf", [64, 64, 128], [1, 10]),
        # (hidden_out, hidden_in), as msModelSlim orders them: the 1x1 into the core gives hidden_in.
        ("from_dict", [20, 10, 128], [1, 10]),
    ],
)
def test_decompose_policies_give_their_exact_ranks(net, choose, conv2, fc):
    decomposer = lowrank.Decompose(net)
    decomposer = {
        "from_fixed": lambda: decomposer.from_fixed(16),
        "from_vbmf": lambda: decomposer.from_vbmf(min_rank=1),
        "from_dict": lambda: decomposer.from_dict({"conv2": (10, 20), "fc.*": "vbmf"}, divisor=1),
    }[choose]()
    model = decomposer.decompose_network()
    assert [layer.out_channels for layer in model.conv2] == conv2
    if fc is None:
        assert isinstance(model.fc, nn.Linear)
    else:
        assert [layer.out_features for layer in model.fc] == fc
    assert model(X).shape == (2, 10)


def test_decompose_from_ratio_is_msmodelslims_parameter_budget(net):
    # 9 h^2 + 256 h = 0.5 * 147456 gives h = 77.4, rounded to 80 (divisor 16); conv1 and fc save nothing.
    decomposer = lowrank.Decompose(net).from_ratio(0.5, divisor=16)
    assert decomposer.decompose_config == {"conv2": (80, 80)}
    model = decomposer.decompose_network()
    assert [m.out_channels for m in model.conv2] == [80, 80, 128]
    # 57.3 -> 64; at divisor 64, 77.4 rounds to 64, 10% below, so 128: no parameter saved, nothing to do.
    assert lowrank.Decompose(net).from_ratio(0.3, divisor=16).decompose_config == {"conv2": (64, 64)}
    with pytest.raises(ValueError, match="Generated decompose_config is not valid"):
        lowrank.Decompose(net).from_ratio(0.5)
    with pytest.raises(ValueError, match="Generated decompose_config is not valid"):
        lowrank.Decompose(net).from_ratio(0.3, excludes=["conv2"], divisor=16)


def test_config_file_gives_every_process_the_ranks_of_the_one_that_chose(net, tmp_path, lowrank_log):
    config = tmp_path / "ranks.json"
    chosen = lowrank.Decompose(net, config_file=config).from_energy(0.6, divisor=1)
    assert json.loads(config.read_text())["layers"][0]["name"] == "conv2"  # an info file (lowrank inspect)
    decomposed = chosen.decompose_network()
    other = Net()  # another process: its own weights, from which energy would pick other ranks
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(torch.linspace(0, 1, param.numel()).reshape(param.shape))
    structure = lowrank.Decompose(other, config_file=config).from_file().decompose_network(do_decompose_weight=False)
    structure.load_state_dict(decomposed.state_dict())
    assert torch.equal(structure(X), decomposed(X))
    # The layers the choice left alone, in the user's words: no "layers" dict was given.
    assert f"Skip: 'conv1': not decomposed in config_file {config}" in lowrank_log


def test_decompose_errors(net, tmp_path):
    with pytest.raises(ValueError, match="Initialized config_file is not valid"):
        lowrank.Decompose(net).from_file()
    with pytest.raises(ValueError, match="Initialized config_file is not valid.*missing.json is not a file"):
        lowrank.Decompose(net, config_file=tmp_path / "missing.json").from_file()
    config = tmp_path / "ranks.json"
    lowrank.Decompose(nn.Sequential(nn.Linear(64, 64)), config_file=config).from_energy(0.5, divisor=1)
    with pytest.raises(lowrank.DecomposeInfoError, match="ranks.json: .*'0'"):
        lowrank.Decompose(net, config_file=config).from_file()
    for choose in ("from_energy",):
        with pytest.raises(ValueError, match="must be given, got None"):
            getattr(lowrank.Decompose(net), choose)(None)
    with pytest.raises(
        ValueError, match="Decompose takes the method when it is built: Decompose\\(model, method='svd'\\)"
    ):
        lowrank.Decompose(net).from_ratio(0.5, method="svd")
    with pytest.raises(ValueError, match="decompose_config not initialized, call from_xxx functions first"):
        lowrank.Decompose(net).decompose_network()


@pytest.mark.parametrize("flag", ["False", None, 0])
def test_do_decompose_weight_must_be_a_bool(net, flag):
    # "False" is truthy: it decomposed the weights when the caller asked for the structure only.
    with pytest.raises(TypeError, match=f"parameter do_decompose_weight need to be a boolean value, got {flag!r}"):
        lowrank.Decompose(net).from_ratio(0.5, divisor=16).decompose_network(do_decompose_weight=flag)


def test_paths_that_are_not_paths_are_named(net):
    with pytest.raises(TypeError, match="decompose_info_path must be a path \\(str or os.PathLike\\), got None"):
        lowrank.decompose_network(net, None)
    with pytest.raises(TypeError, match="decompose_info_path must be a path \\(str or os.PathLike\\), got 1"):
        lowrank.auto_decomposition(net, 1)
    with pytest.raises(ValueError, match="Parameter config_file is not a valid json file name .*got b'r.json'"):
        lowrank.Decompose(net, config_file=b"r.json")
    assert isinstance(net.conv2, nn.Conv2d)


class UsesWeightDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return nn.functional.linear(x, self.proj.weight) + self.proj.bias


class CustomLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class RenamedLinear(nn.Linear):  # as MultiheadAttention's NonDynamicallyQuantizableLinear
    pass


def test_layers_that_cannot_be_replaced_are_skipped_with_a_reason(lowrank_log):
    shared = nn.Linear(64, 64)
    tied_a, tied_b = nn.Linear(64, 64), nn.Linear(64, 64)
    tied_b.weight = tied_a.weight
    hooked = nn.Linear(64, 64)
    hooked.register_forward_hook(lambda *args: None)
    backward_hooked = nn.Linear(64, 64)
    backward_hooked.register_full_backward_pre_hook(lambda *args: None)
    forward_replaced = nn.Linear(64, 64)  # as accelerate's add_hook_to_module (device_map, offloading) does
    forward_replaced.forward = functools.partial(lambda module, x: nn.Linear.forward(module, x) * 2, forward_replaced)
    gradient_masked, stepped_in_backward = nn.Linear(64, 64), nn.Linear(64, 64)
    gradient_masked.weight.register_hook(lambda grad: grad * 0)
    stepped_in_backward.weight.register_post_accumulate_grad_hook(lambda param: None)
    model = nn.ModuleDict(
        {
            "grouped": nn.Conv2d(64, 64, 3, groups=4),
            "depthwise": nn.Conv2d(64, 64, 3, groups=64),
            "transposed": nn.ConvTranspose2d(64, 64, 3),
            "conv1d": nn.Conv1d(64, 64, 3),
            "attention": nn.MultiheadAttention(64, 4),
            "functional": UsesWeightDirectly(),
            "custom": CustomLinear(64, 64),
            "renamed": RenamedLinear(64, 64),
            "shared_a": shared,
            "shared_b": shared,
            "tied_a": tied_a,
            "tied_b": tied_b,
            "hooked": hooked,
            "backward_hooked": backward_hooked,
            "forward_replaced": forward_replaced,
            "gradient_masked": gradient_masked,
            "stepped_in_backward": stepped_in_backward,
            "normed": parametrizations.weight_norm(nn.Linear(64, 64)),
            "lazy": nn.LazyLinear(64),
            "fine": nn.Linear(64, 64),
        }
    )
    _, changes = lowrank.auto_decomposition(model, ratio=0.3)
    assert list(changes) == ["attention.out_proj", "functional.proj", "renamed", "fine"]  # see test_owners.py
    reasons = "\n".join(line for line in lowrank_log if line.startswith("Skip:"))
    for expected in [
        "'grouped': grouped convolution (groups=4)",
        "'depthwise': depthwise convolution (groups=64)",
        "'transposed': ConvTranspose2d is not supported",
        "'conv1d': Conv1d is not supported",
        "'custom': CustomLinear is a subclass of Linear with its own forward",
        "'shared_a': the module is shared with 'shared_b'",
        "'tied_a': its parameters are tied with 'tied_b.weight'",
        "'hooked': hooks are registered on it",
        "'backward_hooked': hooks are registered on it",
        "'forward_replaced': its forward is replaced on the instance (e.g. by an accelerate hook)",
        "'gradient_masked': hooks are registered on its parameters",
        "'stepped_in_backward': hooks are registered on its parameters",
        "'normed': its weight is parametrized",
        "'lazy': its weights are not initialised yet",
    ]:
        assert expected in reasons


class HoldsOutsideSubmodules(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out, self.kept = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.heads = {"main": [self.fc]}  # not registered: swapping self.fc would leave this on the old layer
        self.act = self.out.forward

    def forward(self, x):
        return self.kept(self.act(self.heads["main"][0](x)))


def test_layers_held_outside_the_submodules_are_kept(lowrank_log):
    model = HoldsOutsideSubmodules()
    _, changes = lowrank.auto_decomposition(model, rank=8)
    assert list(changes) == ["kept"]
    assert any("'fc': it is also held as heads['main'][0], outside the registered" in line for line in lowrank_log)
    assert any("'out': it is also held as act, outside" in line for line in lowrank_log)


def test_replaying_refuses_layers_held_outside_the_submodules(tmp_path):
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(nn.Sequential(nn.Linear(64, 64)), info, rank=8)
    model = nn.Sequential(nn.Linear(64, 64))
    model.heads = {"main": model[0]}
    with pytest.raises(lowrank.DecomposeInfoError, match="layer '0' cannot be replaced: it is also held as heads"):
        lowrank.decompose_network(model, info)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    model = nn.Sequential(nn.Conv2d(32, 32, 3)).to(dtype)
    model, _ = lowrank.auto_decomposition(model, ratio=0.3)
    assert all(p.dtype == dtype for p in model.parameters())


def test_memory_format_training_mode_and_requires_grad_are_kept():
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3)).to(memory_format=torch.channels_last)
    model[1].requires_grad_(False)
    model.eval()
    model, _ = lowrank.auto_decomposition(model, method="tucker2")
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in model[0] if m.kernel_size != (1, 1))
    assert all(p.requires_grad for p in model[0].parameters())
    assert not any(p.requires_grad for p in model[1].parameters())
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("method", ["spatial", "tucker2", "svd"])
def test_a_trainable_bias_of_a_frozen_layer_stays_trainable(method):
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Linear(64, 64))  # BitFit: biases alone are trained
    for layer in model:
        layer.weight.requires_grad_(False)
    model, changes = lowrank.auto_decomposition(model, method=method, ratio=0.5)
    assert len(changes) == 2
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{len(model[int(layer)]) - 1}.bias" for layer in ("0", "1")}


def test_meta_weights_need_structure_only(lowrank_log):
    model = nn.Sequential(nn.Conv2d(32, 32, 3, device="meta"))
    _, changes = lowrank.auto_decomposition(model, ratio=0.3)
    assert not changes and any("meta device" in line for line in lowrank_log)
    structure = lowrank.Decompose(model).from_ratio(0.3, divisor=8).decompose_network(do_decompose_weight=False)
    assert structure[0][0].weight.is_meta
    with pytest.raises(ValueError, match="reads the weights, which are on the meta device: load them first"):
        lowrank.Decompose(model).from_energy(0.9).decompose_network(do_decompose_weight=False)
    with pytest.raises(ValueError, match="'0': vbmf reads the weights, which are on the meta device: load them first"):
        lowrank.Decompose(model).from_vbmf()  # msModelSlim chooses in from_vbmf()


def test_count_parameters_and_flops():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert lowrank.count_parameters(model) == 10 * 20 + 20 + 20 * 5 + 5
    assert lowrank.count_flops(model, torch.randn(3, 10)) == 3 * (10 * 20 + 20 * 5)


def test_count_flops_of_a_training_model_with_batch_norm_on_one_sample():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8)).train()
    model[1].eval()
    assert lowrank.count_flops(model, torch.randn(1, 3, 6, 6)) == 8 * 3 * 9 * 16
    assert model.training and not model[1].training and model[3].training  # modes given back
    assert model[3].num_batches_tracked == 0  # running statistics untouched


def test_set_logger_level(lowrank_log):
    try:
        lowrank.set_logger_level("warning")
        lowrank.auto_decomposition(nn.Sequential(nn.Linear(64, 64)))
        assert lowrank_log == []
    finally:
        lowrank.set_logger_level("info")
    with pytest.raises(ValueError, match="unknown log level 'loud'; valid levels: debug, info"):
        lowrank.set_logger_level("loud")


def test_weights_that_are_not_finite_are_refused_before_any_change():
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match="'1' has weights that are not finite \\(NaN or inf\\): nothing was decomposed"
    ):
        lowrank.auto_decomposition(model, ratio=0.3)
    assert all(isinstance(layer, nn.Conv2d) for layer in model)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated, and still used
def test_a_torchscript_module_is_refused_with_the_way_out(tmp_path):
    scripted = torch.jit.script(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(TypeError, match="a TorchScript module cannot be decomposed: decompose the Python model"):
        lowrank.auto_decomposition(scripted)
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(nn.Sequential(nn.Linear(64, 64)), info, ratio=0.5)
    with pytest.raises(TypeError, match="TorchScript"):
        lowrank.decompose_network(scripted, info)
    with pytest.raises(TypeError, match="TorchScript"):  # at once, not at decompose_network()
        lowrank.Decompose(scripted)
    with pytest.raises(ValueError, match="Provided network is not a torch.nn.Module, got str"):
        lowrank.Decompose("resnet50")


def test_replay_refuses_layers_that_cannot_be_replaced_safely(tmp_path):
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), info, ratio=0.5)
    tied = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    tied[1].weight = tied[0].weight
    with pytest.raises(lowrank.DecomposeInfoError, match="layer '0' cannot be replaced: its parameters are tied"):
        lowrank.decompose_network(tied, info)
    assert tied[0].weight is tied[1].weight


def test_a_failure_while_building_leaves_the_model_and_writes_no_info(monkeypatch, tmp_path):
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
    build = lowrank.plan.build_replacement
    built = []

    def build_then_run_out_of_memory(layer, *args, **kwargs):
        if built:
            raise RuntimeError("can't allocate memory")
        built.append(layer)
        return build(layer, *args, **kwargs)

    monkeypatch.setattr(lowrank.plan, "build_replacement", build_then_run_out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        lowrank.auto_decomposition(model, tmp_path / "info.json", ratio=0.3)
    assert built and all(isinstance(layer, nn.Conv2d) for layer in model)
    assert not (tmp_path / "info.json").exists()


def test_a_model_wrapped_for_distributed_training_is_refused():
    import torch._dynamo  # noqa: F401 (before any process group: imported later, it keeps the group alive)
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 64)))
        with pytest.raises(TypeError, match="wrapped in DistributedDataParallel.* decompose the unwrapped model"):
            lowrank.auto_decomposition(wrapped)
        with pytest.raises(TypeError, match="wrapped in DistributedDataParallel \\(at 'body'\\)"):
            lowrank.Decompose(nn.ModuleDict({"body": wrapped})).from_ratio(0.5).decompose_network()
        assert isinstance(wrapped.module[0], nn.Linear)
    finally:
        dist.destroy_process_group()


def test_a_model_that_cannot_be_copied_names_the_in_place_way(net):
    net.scale = torch.ones(2, requires_grad=True) * 2  # not a leaf tensor: deepcopy refuses it
    with pytest.raises(TypeError, match="this one cannot be copied .*: decompose it in place with lowrank.auto_"):
        lowrank.Decompose(net).from_ratio(0.5, divisor=16).decompose_network()


def test_an_info_path_that_cannot_be_written_is_named_before_any_work(net, tmp_path, lowrank_log):
    with pytest.raises(ValueError, match=f"decompose_info_path: {tmp_path} is a folder"):
        lowrank.auto_decomposition(net, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file is a file, not a folder"):
        lowrank.auto_decomposition(net, tmp_path / "file" / "info.json")
    assert not any(line.startswith("Processing") for line in lowrank_log)
    assert isinstance(net.conv2, nn.Conv2d)


class TakesKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 20)

    def forward(self, input_ids, *, scale):
        return self.fc(input_ids) * scale


def test_example_inputs_may_be_keyword_arguments():
    inputs = {"input_ids": torch.randn(3, 10), "scale": 2.0}
    assert lowrank.count_flops(TakesKeywords(), inputs) == 3 * 10 * 20
    assert lowrank.count_flops(nn.Linear(10, 20), (torch.randn(3, 10),)) == 3 * 10 * 20


def test_decomposing_leaves_the_random_state_alone(net):
    torch.manual_seed(1)
    _, changes = lowrank.auto_decomposition(net, method="tucker2")
    after = torch.rand(3)
    torch.manual_seed(1)
    assert changes and torch.equal(torch.rand(3), after)  # the new modules are not initialised, only filled


class HoldsParametersOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.tail, self.kept = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.weights = {"head": self.head.weight}  # not registered: it would keep the old weight
        self.tail_parameters = [self.tail.weight, self.tail.bias]

    def forward(self, x):
        x = nn.functional.linear(self.kept(x), self.weights["head"])
        return nn.functional.linear(x, *self.tail_parameters)


def test_parameters_held_outside_the_module_keep_the_layer(lowrank_log, tmp_path):
    model = HoldsParametersOutside()
    _, changes = lowrank.auto_decomposition(model, rank=8)
    assert list(changes) == ["kept"]
    assert any("'head': its weight is also held as weights['head'], outside" in line for line in lowrank_log)
    assert any("'tail': its weight is also held as tail_parameters[0]" in line for line in lowrank_log)
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(nn.ModuleDict({"head": nn.Linear(64, 64)}), info, rank=8)
    with pytest.raises(lowrank.DecomposeInfoError, match="layer 'head' cannot be replaced: its weight is also held"):
        lowrank.decompose_network(HoldsParametersOutside(), info)


def pruned_linear():  # the weight cut by a pruning tool that left out_features as it was
    layer = nn.Linear(64, 64)
    layer.weight, layer.bias = nn.Parameter(layer.weight[:48].detach()), nn.Parameter(layer.bias[:48].detach())
    return layer


def conv_with(**settings):  # set after construction, as code that turns strides into dilations does
    layer = nn.Conv2d(32, 32, 3, padding=1, padding_mode=settings.pop("padding_mode", "zeros"))
    for name, value in settings.items():
        setattr(layer, name, value)
    return layer


@pytest.mark.parametrize(
    "layer, x, reason",
    [
        (pruned_linear(), torch.randn(2, 64), "its weight has shape (48, 64) where its configuration says (64, 64)"),
        (conv_with(stride=2), torch.randn(2, 32, 12, 12), "its stride 2 is not a pair"),
        (
            conv_with(padding_mode="reflect", padding=(2, 2), dilation=(2, 2)),
            torch.randn(2, 32, 12, 12),
            "its padding, kernel, stride or dilation changed after construction: padding_mode='reflect' still pads by "
            "(1, 1, 1, 1)",
        ),
    ],
    ids=["pruned", "int stride", "stale reflect padding"],
)
def test_a_configuration_that_does_not_describe_the_layer_keeps_it(layer, x, reason, lowrank_log, tmp_path):
    model = nn.Sequential(layer)
    expected = model(x)
    _, changes = lowrank.auto_decomposition(model, tmp_path / "info.json", rank=8)
    assert not changes and model[0] is layer
    assert torch.equal(model(x), expected)
    assert any(reason in line for line in lowrank_log)


def test_layers_of_a_fused_module_for_quantization_are_kept(lowrank_log):
    # quantization converts a fused module from the weight of its first layer
    fused = torch.ao.nn.intrinsic.ConvReLU2d(nn.Conv2d(32, 32, 3), nn.ReLU())
    _, changes = lowrank.auto_decomposition(nn.Sequential(fused, nn.Conv2d(32, 32, 3)), ratio=0.3)
    assert list(changes) == ["1"]
    reason = "'0.0': it is part of ConvReLU2d, a fused module that quantization converts as a whole"
    assert any(reason in line for line in lowrank_log)


def test_fake_quantized_and_partly_parametrized_layers_are_named_clearly(lowrank_log):
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    scaled = nn.Linear(64, 64)
    torch.nn.utils.parametrize.register_parametrization(scaled, "bias", nn.Identity())
    model = nn.ModuleDict({"qat": torch.ao.nn.qat.Linear(64, 64, qconfig=qconfig), "scaled": scaled})
    _, changes = lowrank.auto_decomposition(model, ratio=0.3)
    assert not changes
    reasons = "\n".join(lowrank_log)
    qat = "torch.ao.nn.qat.modules.linear.Linear is a subclass of torch.nn.Linear with its own forward"
    assert f"'qat': {qat}" in reasons
    assert "'scaled': its bias is parametrized" in reasons


def mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def test_a_compiled_model_is_decomposed_under_its_own_layer_names(tmp_path):
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(2, 64)
    plain = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    info = tmp_path / "info.json"
    _, changes = lowrank.auto_decomposition(compiled, info, rank=8)
    assert list(changes) == ["0", "2"]  # not "_orig_mod.0": the file replays on the model compiled or not
    lowrank.auto_decomposition(plain, rank=8)
    assert torch.equal(compiled(x), plain(x))  # recompiled: the new layers run
    replayed = lowrank.decompose_network(mlp(), info)[0]
    replayed.load_state_dict(plain.state_dict())
    assert torch.equal(replayed(x), plain(x))
    assert list(lowrank.decompose_network(torch.compile(mlp(), backend="eager"), info)[1]) == ["0", "2"]
    structure = lowrank.Decompose(torch.compile(mlp(), backend="eager"), config_file=info).from_file()
    assert isinstance(structure.decompose_network(do_decompose_weight=False)._orig_mod[2], nn.Sequential)


def test_a_layer_compiled_on_its_own_is_kept(lowrank_log):
    model = mlp()
    model[2] = torch.compile(model[2], backend="eager")  # its forward calls the layer it was given
    _, changes = lowrank.auto_decomposition(model, rank=8)
    assert list(changes) == ["0"]
    assert any("'2._orig_mod': it is compiled on its own (torch.compile)" in line for line in lowrank_log)
