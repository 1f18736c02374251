"""Owners that use their layers other than by calling them: the replacement answers for the dense layer
(its settings, its ``weight`` as the product of its factors), and with an example input the observed
forward pass leaves dense the layers whose weights are used outside their own ``forward``."""

import copy
import functools
import json
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowrank
from lowrank.eligibility import LAYER_TYPES

X64 = (torch.randn(2, 64),)
IMAGES = (torch.randn(2, 64, 12, 12),)


class UsesWeightDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return F.linear(x, self.proj.weight) + self.proj.bias


class ConvThenHead(nn.Module):  # the example: only the conv's weight is used outside its forward
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)))


class CosineClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])
        self.other = nn.Linear(64, 64)

    def forward(self, x):
        x = self.other(self.layers[0](x))
        return F.linear(x, F.normalize(self.layers[-1].weight))


class ThroughLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))

    def forward(self, x):
        for block in self.blocks:
            x = F.linear(x, block.weight)
        return x


class InACallbackOfForward(ThroughLoop):
    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)


def tied_forward(self, x):
    return F.linear(self.other(x), self.fc.weight)


class ForwardSetOnTheInstance(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.other = nn.Linear(64, 64), nn.Linear(64, 64)
        self.forward = types.MethodType(tied_forward, self)


class TiedThroughAFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.body = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return F.linear(self.enc(self.body(x)), self.enc.weight.t())


def linear_head(layer, x):
    return F.linear(x, layer.weight, layer.bias)


class PassesToHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.out(x) + linear_head(self.fc, x)


class ChecksDtype(nn.Module):  # as Hugging Face's T5 feed-forward block: metadata only, no use
    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        x = F.relu(self.wi(x))
        if isinstance(self.wo.weight, torch.Tensor) and x.dtype != self.wo.weight.dtype:
            x = x.to(self.wo.weight.dtype)
        return self.wo(x)


def attention():
    return nn.MultiheadAttention(64, 4)


# Each owner, its example input, and what auto_decomposition(rank=8) replaces given that example.
OWNERS = {
    "functional": (UsesWeightDirectly, X64, []),
    "issue example": (ConvThenHead, IMAGES, ["head"]),
    "normalised": (CosineClassifier, X64, ["layers.0", "other"]),
    "loop": (ThroughLoop, X64, []),
    "checkpointed": (InACallbackOfForward, X64, []),
    "instance forward": (ForwardSetOnTheInstance, X64, ["other"]),
    "transposed": (TiedThroughAFunctional, X64, ["body"]),
    "helper": (PassesToHelper, X64, ["out"]),
    "dtype check": (ChecksDtype, X64, ["wi", "wo"]),
    "attention": (attention, (torch.randn(3, 2, 64),) * 3, []),
}


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LAYER_TYPES)]


def dense_equivalent(original: nn.Module, decomposed: nn.Module, changes) -> nn.Module:
    """``original`` with each replaced layer's weight and bias set to its replacement's: what the
    decomposed model must compute."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name in changes:
            layer, replacement = reference.get_submodule(name), decomposed.get_submodule(name)
            layer.weight.copy_(replacement.weight)
            if layer.bias is not None:
                layer.bias.copy_(replacement.bias)
    return reference


@pytest.mark.parametrize("make, x, replaced", OWNERS.values(), ids=OWNERS.keys())
def test_without_an_example_input_owners_compute_with_the_dense_equivalent(make, x, replaced):
    torch.manual_seed(0)
    original = make().eval()
    model = copy.deepcopy(original)
    _, changes = lowrank.auto_decomposition(model, rank=8)
    assert list(changes) == layer_names(original)
    torch.testing.assert_close(model(*x), dense_equivalent(original, model, changes)(*x))


@pytest.mark.parametrize("make, x, replaced", OWNERS.values(), ids=OWNERS.keys())
def test_with_an_example_input_layers_whose_weights_are_used_outside_their_forward_stay_dense(
    make, x, replaced, lowrank_log
):
    torch.manual_seed(0)
    original = make().eval()
    model = copy.deepcopy(original)
    _, changes = lowrank.auto_decomposition(model, rank=8, example_input=x)
    assert list(changes) == replaced
    for name in set(layer_names(original)) - set(replaced):
        assert isinstance(model.get_submodule(name), nn.Linear | nn.Conv2d)
        reason = f"Skip: {name!r}: its weight is used outside its own forward ("
        assert any(line.startswith(reason) for line in lowrank_log)
    torch.testing.assert_close(model(*x), dense_equivalent(original, model, changes)(*x))


def test_the_reason_names_the_function_that_used_the_weight(lowrank_log, tmp_path):
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(CosineClassifier(), info, rank=8, example_input=X64)
    reason = (
        "its weight is used outside its own forward (normalize, seen when the model ran on example_input): "
        "decomposed, it would be computed from the factors there, which saves nothing"
    )
    assert f"Skip: 'layers.1': {reason}" in lowrank_log
    assert {"name": "layers.1", "reason": reason} in json.loads(info.read_text())["skipped"]
    lowrank.auto_decomposition(TiedThroughAFunctional(), rank=8, example_input=X64)
    reason = "Skip: 'enc': its weight is used outside its own forward (Tensor.t,"
    assert any(line.startswith(reason) for line in lowrank_log)


class RescalesInForward(ThroughLoop):  # as Hugging Face's RWKV rescales its layers' weights
    def forward(self, x):
        with torch.no_grad():
            for block in self.blocks:
                block.weight.mul_(1.0)
        return self.blocks(x)


def clip_weights(model, args):  # a user's forward pre-hook on the model
    with torch.no_grad():
        model[1].weight.clamp_(-1, 1)


def clipped():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model.register_forward_pre_hook(clip_weights)
    return model


@pytest.mark.parametrize(
    "make, replaced, function", [(RescalesInForward, [], "Tensor.mul_"), (clipped, ["0"], "Tensor.clamp_")]
)
def test_weights_changed_in_place_stay_dense_when_observed_and_raise_otherwise(make, replaced, function, lowrank_log):
    model = make()
    _, changes = lowrank.auto_decomposition(model, rank=8, example_input=X64)
    assert list(changes) == replaced
    assert any(f"its weight is used outside its own forward ({function}," in line for line in lowrank_log)
    model(*X64)
    unobserved = make()
    lowrank.auto_decomposition(unobserved, rank=8)
    # Changing the computed weight would change a copy: it raises rather than doing nothing.
    with pytest.raises(RuntimeError, match=r"_: a decomposed layer's weight is computed from its factors on each"):
        unobserved(*X64)


class SetsPadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3)

    def forward(self, x):
        self.conv.padding = (1, 1)
        return self.conv(x)


def test_a_setting_changed_by_the_forward_pass_stays_dense_when_observed(lowrank_log):
    model = SetsPadding()
    _, changes = lowrank.auto_decomposition(model, rank=8, example_input=IMAGES)
    assert not changes
    assert "Skip: 'conv': its padding changes when the model runs on example_input ((0, 0) -> (1, 1)), which " in (
        " ".join(lowrank_log)
    )
    unobserved = SetsPadding()
    lowrank.auto_decomposition(unobserved, rank=8)
    with pytest.raises(AttributeError, match=r"Conv2d.padding is read-only: it describes the dense layer"):
        unobserved(*IMAGES)
    settled = SetsPadding()
    settled(*IMAGES)  # the padding it sets is now its own: setting it again changes nothing
    _, changes = lowrank.auto_decomposition(settled, rank=8, example_input=IMAGES)
    assert list(changes) == ["conv"] and settled(*IMAGES).shape == IMAGES[0].shape


class SamePadding(nn.Module):  # TensorFlow-style "same" padding, computed from the conv's own settings
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, stride=2)

    def forward(self, x):
        pad = max(self.conv.kernel_size[0] - self.conv.stride[0], 0)
        return self.conv(F.pad(x, (pad // 2, pad - pad // 2) * 2))


class ReadsWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.fc.is_head = True  # a flag set on the layer, which its owner reads

    @property
    def out_features(self):  # as timm's ConvNormAct.in_channels
        return self.fc.out_features if self.fc.is_head else 0

    def forward(self, x):
        return self.fc(x).view(-1, self.out_features)


@pytest.mark.parametrize("make, x", [(SamePadding, IMAGES), (ReadsWidth, X64)], ids=["padding", "width"])
def test_owners_read_the_layer_configuration_and_attributes_of_the_replacement(make, x):
    model = make()
    layer_name, layer = next((n, m) for n, m in model.named_children() if isinstance(m, LAYER_TYPES))
    config = {name: value for name, value in vars(layer).items() if not name.startswith("_") and name != "training"}
    expected = model(*x)
    _, changes = lowrank.auto_decomposition(model, rank=8, example_input=x)
    assert list(changes) == [layer_name]
    replacement = getattr(model, layer_name)
    assert {name: getattr(replacement, name) for name in config} == config
    assert model(*x).shape == expected.shape


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)

    def forward(self, x):
        return self.bn(self.conv(x))


class FusesItsBranches(nn.Module):
    """As timm's RepVGG and MobileOne blocks: a method given a branch reads the weights of its conv."""

    def __init__(self):
        super().__init__()
        self.branch, self.branches = ConvBN(), nn.ModuleList([ConvBN(), ConvBN()])

    def forward(self, x):
        return self.branch(x) + self.branches[0](x) + self.branches[1](x)

    def fuse(self):
        return sum(self._fuse_bn(branch) for branch in (self.branch, *self.branches))

    @staticmethod
    def _fuse_bn(branch):
        scale = branch.bn.weight / (branch.bn.running_var + branch.bn.eps).sqrt()
        return branch.conv.weight * scale.reshape(-1, 1, 1, 1)


def test_a_block_that_fuses_its_branches_fuses_the_dense_equivalent():
    original = FusesItsBranches().eval()
    model = copy.deepcopy(original)
    _, changes = lowrank.auto_decomposition(model, rank=8, example_input=IMAGES)  # fusing is not in forward
    assert list(changes) == ["branch.conv", "branches.0.conv", "branches.1.conv"]
    torch.testing.assert_close(model.fuse(), dense_equivalent(original, model, changes).fuse())


def test_an_initialiser_that_writes_a_replaced_weight_raises_with_the_way_out():
    model = nn.Sequential(ConvBN())
    lowrank.auto_decomposition(model, rank=8)
    with pytest.raises(RuntimeError, match=r"zero_: .* change the factors \(the weights of the replacement's"):
        nn.init.zeros_(model[0].conv.weight)
    with pytest.raises(RuntimeError, match="normal_: a decomposed layer's weight"):
        model[0].conv.weight.data.normal_()  # .data keeps the protection
    for factor in model[0].conv:  # what an initialiser given every module does
        nn.init.zeros_(factor.weight)
    assert not model[0].conv.weight.any()


def test_amcts_choice_with_an_example_input_leaves_observed_layers_dense(tmp_path, lowrank_log):
    torch.manual_seed(0)
    model, info = ConvThenHead(), tmp_path / "info.json"
    _, changes = lowrank.auto_decomposition(model, info, example_input=IMAGES)
    assert list(changes) == ["head"]
    assert [record["ori_layer_info"]["name"] for record in json.loads(info.read_text())] == ["head"]  # AMCT's file
    reason = "Skip: 'conv': its weight is used outside its own forward (conv2d,"
    assert any(line.startswith(reason) for line in lowrank_log)
    replayed = ConvThenHead()
    lowrank.decompose_network(replayed, info)
    assert isinstance(replayed.conv, nn.Conv2d) and len(replayed.head) == 2


def test_replaying_decomposes_a_layer_its_owner_uses_directly(tmp_path):
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(nn.ModuleDict({"proj": nn.Linear(64, 64)}), info, rank=8)
    original = UsesWeightDirectly()
    model = copy.deepcopy(original)
    _, changes = lowrank.decompose_network(model, info)
    assert list(changes) == ["proj"]
    torch.testing.assert_close(model(*X64), dense_equivalent(original, model, changes)(*X64))


def test_msmodelslims_choice_decomposes_attention_which_computes_with_the_dense_equivalent():
    original = nn.ModuleDict({"attention": nn.MultiheadAttention(64, 4), "fc": nn.Linear(64, 64)})
    decomposer = lowrank.Decompose(original).from_fixed(8, divisor=8)
    assert set(decomposer.decompose_config) == {"attention.out_proj", "fc"}  # msModelSlim's choice
    decomposed = decomposer.decompose_network()
    assert len(decomposed["attention"].out_proj) == 2 and len(decomposed["fc"]) == 2
    x = torch.randn(3, 2, 64)
    reference = dense_equivalent(original, decomposed, ["attention.out_proj"])
    torch.testing.assert_close(decomposed["attention"](x, x, x)[0], reference["attention"](x, x, x)[0])


def test_observing_restores_hooks_and_modes_and_names_a_model_that_does_not_run():
    model = clipped().train()
    with pytest.raises(ValueError, match="example_input: the model does not run on it: RuntimeError: "):
        lowrank.auto_decomposition(model, rank=8, example_input=torch.randn(2, 3))
    assert all(isinstance(layer, nn.Linear) for layer in model)
    assert model.training and len(model._forward_pre_hooks) == 1
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in model)


def test_a_weight_used_by_an_owners_hook_after_its_layer_ran_counts():
    shared_input = functools.partial(F.linear, torch.randn(2, 64))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model.register_forward_hook(lambda module, args, output: output + shared_input(module[0].weight))
    _, changes = lowrank.auto_decomposition(model, rank=8, example_input=X64)
    assert list(changes) == ["1"]  # layer 0's weight enters a hook of its owner, after its own forward
