import json
import os
import stat

import pytest
import safetensors.torch
import torch
from torch import nn

import lowrank
from launch.mnist import Net
from lowrank import DecomposeInfoError
from lowrank.io import atomic_write, load_state_dict, save_state_dict
from lowrank.methods import METHODS


@pytest.fixture
def info(net, tmp_path):
    """lowrank's own info file: ratio=0.3 (a policy keyword selects lowrank's rules and file format)."""
    path = tmp_path / "out" / "decompose_info.json"
    lowrank.auto_decomposition(net, path, ratio=0.3)
    return path


def edit(path, change):
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_info_file_content(info):
    document = json.loads(info.read_text())
    assert document["format"] == "lowrank-decompose-info" and document["version"] == 1  # no timings
    (layer,) = document["layers"]
    assert layer["name"] == "conv2" and layer["method"] == "spatial" and layer["type"] == "Conv2d"
    assert layer["args"]["in_channels"] == 128 and layer["weight_shape"] == [128, 128, 3, 3]
    rank = layer["ranks"][0]
    assert [m["name"] for m in layer["modules"]] == ["conv2.0", "conv2.1"]
    assert [m["weight_shape"] for m in layer["modules"]] == [[rank, 128, 3, 1], [128, rank, 1, 3]]
    assert {s["name"] for s in document["skipped"]} == {"conv1", "fc"}
    assert document["policy"]["rule"] == "ratio=0.3" and document["policy"]["method"] == "spatial"


def test_files_are_owner_and_group_only(info, tmp_path):
    assert stat.S_IMODE(os.stat(info).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(info.parent).st_mode) == 0o750
    amct = tmp_path / "amct" / "decompose_info.json"
    lowrank.auto_decomposition(Net(), amct)  # AMCT's info file, written by its own writer
    assert isinstance(json.loads(amct.read_text()), list)
    assert stat.S_IMODE(os.stat(amct).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(amct.parent).st_mode) == 0o750
    save_state_dict({"w": torch.ones(2)}, tmp_path / "a" / "b" / "weights.pth")
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b" / "weights.pth").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o750


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "info.json"
    path.write_text("old")

    def fail(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["info.json"]


def test_weights_load_safely(tmp_path):
    path = tmp_path / "weights.pth"
    save_state_dict({"w": torch.ones(3)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"cannot read weights file {path}"):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_state_dict(tmp_path / "missing.pth")


def test_weights_files_that_are_not_state_dicts_are_named(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # the whole model: unpickling it would run code
    with pytest.raises(ValueError, match=r"pickles Python objects \(torch.nn.modules.linear.Linear\).*state_dict"):
        load_state_dict(path)
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"holds a training checkpoint \('model', 'epoch'\).*\['model'\]"):
        load_state_dict(path)
    path.write_bytes(b"not a checkpoint")  # torch's advice to load it with weights_only=False is left out
    with pytest.raises(ValueError, match=r"not a PyTorch state dict\?\): UnpicklingError: Unsupported operand \d+$"):
        load_state_dict(path)


def test_weights_load_from_state_dicts_of_every_kind(tmp_path):
    class ExtraState(torch.nn.Linear):
        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            pass

    path = tmp_path / "weights.pth"
    save_state_dict(ExtraState(2, 2).state_dict(), path)  # a dict among its tensors: not a checkpoint
    assert load_state_dict(path)["_extra_state"] == {"calibrated": True}
    safetensors.torch.save_file({"weight": torch.ones(2, 2)}, path)  # a safetensors file, whatever its name
    assert torch.equal(load_state_dict(path)["weight"], torch.ones(2, 2))


def at_rank(layer, rank):
    """A spatial record edited by hand to another rank, consistently."""
    first, last = layer["modules"]
    first["args"]["out_channels"], last["args"]["in_channels"] = rank, rank
    first.pop("weight_shape"), last.pop("weight_shape")
    layer["ranks"] = [rank]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(version=7), "unsupported info file version 7; this lowrank reads versions 1, 2"),
        (lambda d: d.update(version=True), "unsupported info file version True"),
        (lambda d: d.update(version=1.0), "unsupported info file version 1.0"),
        (lambda d: d.update(format="other"), "not a decomposition info file"),
        (lambda d: d.update(layers={}), "'layers' must be a list"),
        (lambda d: d["layers"][0].update(name="conv9"), "layer 'conv9' is not in the model"),
        (lambda d: d["layers"][0].update(name="fc"), "layer 'fc' is Linear in the model but Conv2d in the file"),
        (
            lambda d: d["layers"][0]["args"].update(in_channels=64),
            "layer 'conv2': in_channels is 128 in the model but 64 in the file",
        ),
        (
            lambda d: d["layers"][0]["args"].update(padding=[1, 1]),
            r"layer 'conv2': padding is \[0, 0\] in the model but \[1, 1\]",
        ),
        (
            lambda d: d["layers"][0].update(method="cp"),
            "layer 'conv2': unknown method 'cp'; valid methods: svd, spatial, tucker2",
        ),
        (lambda d: d["layers"][0].pop("modules"), "layer 'conv2' has no 'modules'"),
        (
            lambda d: d["layers"][0]["modules"][0].update(type="Conv3d"),
            "layer 'conv2', module 0: type 'Conv3d' is not one of Conv2d, Linear",
        ),
        (lambda d: d["layers"][0]["modules"][0]["args"].update(colour=1), "layer 'conv2', module 0: invalid arguments"),
        (
            lambda d: d["layers"][0]["modules"][1].update(weight_shape=[1, 2, 3, 4]),
            r"module 1: weight shape \[1, 2, 3, 4\] does not match",
        ),
        (
            lambda d: d["layers"][0]["modules"][1]["args"].update(padding=[0, 1]),
            r"layer 'conv2': the recorded modules are not the spatial decomposition of the layer at ranks \[57\]: "
            r"module 1: padding is \[0, 1\], the method builds \[0, 0\]",
        ),
        (
            lambda d: (
                d["layers"][0]["modules"][1]["args"].update(in_channels=3),
                d["layers"][0]["modules"][1].pop("weight_shape"),
            ),
            "layer 'conv2': the recorded modules are not .* module 1: in_channels is 3, the method builds 57",
        ),
        (lambda d: d["layers"].append(d["layers"][0]), "layer 'conv2' appears twice"),
        # Files that build and load but would compute something else than the decomposition they name:
        (
            lambda d: d["layers"][0]["modules"][0]["args"].update(padding_mode="circular"),
            "module 0: padding_mode is 'circular', the method builds 'zeros'",
        ),
        (
            lambda d: d["layers"][0]["modules"][1]["args"].update(bias=False),
            "module 1: bias is False, the method builds True",
        ),
        (
            lambda d: d["layers"][0].update(method="tucker2", ranks=[3, 3]),
            r"not the tucker2 decomposition of the layer at ranks \[3, 3\]: 2 modules recorded, the method builds 3",
        ),
        (
            lambda d: d["layers"][0].update(ranks=[True]),
            r"layer 'conv2': spatial needs 1 positive integer ranks \(rank\), got \[True\]",
        ),
        (
            lambda d: d["layers"][0].update(method="svd"),
            r"not the svd decomposition .* module 0: kernel_size is \[3, 1\], the method builds \[3, 3\]",
        ),
        (lambda d: d["layers"][0].update(name=""), "layer '' is Net in the model but Conv2d in the file"),
        (
            lambda d: at_rank(d["layers"][0], 2**40),  # modules and all: it would build, then fail to allocate
            r"layer 'conv2': ranks \[1099511627776\] exceed the layer's full ranks \[384\]",
        ),
        # true == 1 in Python, not in JSON: such a file would fail only once the model runs
        (lambda d: d["layers"][0]["modules"][0]["args"].update(groups=True), "module 0: groups is True, the method"),
        (lambda d: d["layers"][0]["args"].update(groups=True), "layer 'conv2': groups is 1 in the model but True"),
    ],
)
def test_malformed_info_files_name_the_file_layer_and_mismatch(info, change, message):
    edit(info, change)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DecomposeInfoError, match=message) as error:
        lowrank.decompose_network(model, info)
    assert str(info) in str(error.value)
    assert isinstance(model.conv2, nn.Conv2d)  # untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unreadable_files(tmp_path):
    path = tmp_path / "info.json"
    path.write_text('{"format": "lowrank-decompose-info",\n "version": 1,,}')
    with pytest.raises(DecomposeInfoError, match=f"{path}: malformed JSON at line 2, column 15"):
        lowrank.decompose_network(Net(), path)
    path.write_text('"text"')
    with pytest.raises(
        DecomposeInfoError, match=r"expected a JSON object \(lowrank, msModelSlim\) or list \(AMCT\), got str"
    ):
        lowrank.decompose_network(Net(), path)
    with pytest.raises(FileNotFoundError, match="decomposition info file not found"):
        lowrank.decompose_network(Net(), tmp_path / "missing.json")


def test_an_already_decomposed_model_is_named(info, net):
    with pytest.raises(
        DecomposeInfoError,
        match="is SpatialConv2d in the model but Conv2d in the file \\(is the model already decomposed\\?\\)",
    ):
        lowrank.decompose_network(net, info)


def test_a_lazy_layer_not_yet_run_is_named(tmp_path):
    # A LazyLinear becomes a Linear when it first runs: the decomposed model's file says Linear.
    def make():
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(64), nn.Linear(64, 64))

    model = make()
    model(torch.randn(2, 32))
    lowrank.auto_decomposition(model, tmp_path / "info.json", rank=8)
    with pytest.raises(
        DecomposeInfoError, match="layer '1' is LazyLinear in the model but Linear in the file \\(a lazy module: run"
    ):
        lowrank.decompose_network(make(), tmp_path / "info.json")


def amct_record(first, last, mode="SCFK", name="conv2"):
    return {
        "ori_layer_info": {"layer_name": name},
        "mode": mode,
        "decom_nodes": {"first": {"weight_shape": first}, "last": {"weight_shape": last}},
    }


@pytest.mark.parametrize(
    "first,last,kernels",
    [([40, 128, 3, 1], [128, 40, 1, 3], ((3, 1), (1, 3))), ([40, 128, 1, 3], [128, 40, 3, 1], ((1, 3), (3, 1)))],
)
def test_amct_info_files(tmp_path, first, last, kernels, lowrank_log):
    path = tmp_path / "amct.json"
    path.write_text(json.dumps([amct_record(first, last)]))
    model, changes = lowrank.decompose_network(Net(), path)
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    assert (model.conv2[0].kernel_size, model.conv2[1].kernel_size) == kernels
    assert model.conv2[0].weight.shape == tuple(first) and model.conv2[1].weight.shape == tuple(last)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize(
    "record,message",
    [
        (
            amct_record([40, 128, 3, 1], [128, 40, 1, 3], mode="XXXX"),
            "unknown mode 'XXXX'; AMCT modes: FCFK, FCSK, SCFK, SCSK",
        ),
        (
            amct_record([40, 128, 3, 1], [128, 40, 3, 1]),
            r"weight shapes \[40, 128, 3, 1\] and \[128, 40, 3, 1\] are not a spatial decomposition",
        ),
        (
            amct_record([40, 64, 3, 1], [128, 40, 1, 3]),
            "are not a spatial decomposition of the model's 128x128x3x3 kernel",
        ),
        (amct_record([40, 128, 3, 1], [128, 40, 1, 3], name="conv7"), "layer 'conv7' is not in the model"),
        (
            amct_record([40, 128, 3, 1], [128, 40, 1, 3], name="module.conv2"),
            r"layer 'module.conv2' is not in the model \(the name starts with 'module.': written from a model wrapped",
        ),
        (amct_record([True, 128, 3, 1], [128, True, 1, 3]), "are not a spatial decomposition"),
        (amct_record([40, True, 3, 1], [128, 40, 1, 3]), "are not a spatial decomposition"),
        (amct_record([385, 128, 3, 1], [128, 385, 1, 3]), "layer 'conv2': rank 385 exceeds the layer's full rank 384"),
        (amct_record([40, 128, 3, 1], [128, 40, 1, 3], name="fc"), "layer 'fc' is Linear in the model but Conv2d"),
        ({"mode": "SCFK"}, "record 0 has no 'ori_layer_info'"),
        ({"ori_layer_info": {}, "mode": "SCFK"}, "ori_layer_info has none of name, layer_name, op_name"),
        (
            {
                "ori_layer_info": {"layer_name": "conv2", "in_channels": 64},
                **{k: v for k, v in amct_record([40, 128, 3, 1], [128, 40, 1, 3]).items() if k != "ori_layer_info"},
            },
            "in_channels is 128 in the model but 64 in the file",
        ),
    ],
)
def test_bad_amct_records(tmp_path, record, message):
    path = tmp_path / "amct.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DecomposeInfoError, match=message):
        lowrank.decompose_network(Net(), path)


def test_amct_records_of_grouped_convs_are_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=4))
    path = tmp_path / "amct.json"
    path.write_text(json.dumps([amct_record([8, 32, 3, 1], [32, 8, 1, 3], name="0")]))
    with pytest.raises(
        DecomposeInfoError, match="layer '0': AMCT decomposes ungrouped convolutions; the model's has groups=4"
    ):
        lowrank.decompose_network(model, path)


def test_spatial_ranks_are_bounded_by_the_full_rank_of_their_order(tmp_path):
    # A (3, 5) kernel on 2 channels: full rank 6 vertical first (2 x 3), 10 horizontal first (2 x 5).
    model = nn.Sequential(nn.Conv2d(2, 128, (3, 5)))
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(model, info, rank=6, method="spatial")
    specs = METHODS["spatial"].specs(nn.Conv2d(2, 128, (3, 5)), (7,), vertical_first=True)
    edit(info, lambda d: d["layers"][0].update(ranks=[7], modules=json.loads(json.dumps(specs))))
    with pytest.raises(DecomposeInfoError, match=r"layer '0': ranks \[7\] exceed the layer's full ranks \[6\]"):
        lowrank.decompose_network(nn.Sequential(nn.Conv2d(2, 128, (3, 5))), info)
