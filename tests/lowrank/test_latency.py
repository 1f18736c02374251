"""The latency rule. Structure is tested with a fake clock (timings on a shared 2-core machine are
noise); one test runs the real clock on a tiny model and checks only what must hold whatever the
timings are."""

import json

import pytest
import torch
from torch import nn

import lowrank
from launch.mnist import Net
from lowrank import latency
from lowrank.cli import main
from lowrank.latency import largest_within
from lowrank.methods import METHODS
from lowrank.observe import InputSpec, observe
from lowrank.policy import RankPolicy


def model_of_two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3))


X = torch.randn(4, 16, 12, 12)


def fake_seconds(module, inputs):
    """A clock that charges a module's weight size times its output positions, and makes every
    replacement of the first conv (16 input channels) ten times slower than its size says."""
    (spec,) = inputs
    batch, _, height, width = spec.shape
    convs = list(module) if isinstance(module, nn.Sequential) else [module]
    size = sum(conv.weight.numel() for conv in convs) * batch * (height - 2) * (width - 2)
    slow = isinstance(module, nn.Sequential) and module[0].in_channels == 16
    return 1e-9 * size * (10 if slow else 1)


@pytest.fixture
def fake_clock(monkeypatch):
    calls = []

    def clock(module, inputs):
        calls.append(module)
        return fake_seconds(module, inputs)

    monkeypatch.setattr(latency, "seconds", clock)
    return calls


def no_clock(module, inputs):
    raise AssertionError("replaying an info file must not time anything")


def test_largest_within_bisects_for_the_largest_fitting_candidate():
    candidates = list(range(1, 101))
    index, probes = largest_within(candidates, lambda c: c / 100, lambda seconds: seconds <= 0.37)
    assert candidates[index] == 37
    assert len(probes) <= 7 and (37, 0.37) in probes
    index, probes = largest_within(candidates, lambda c: 1.0, lambda seconds: seconds < 0.5)
    assert index is None and probes[-1][0] == 1  # ends on the smallest candidate
    assert largest_within([], lambda c: 0.0, lambda seconds: True) == (None, [])


def test_only_layers_measured_fast_enough_are_replaced_and_the_choices_are_recorded(fake_clock, tmp_path, lowrank_log):
    info = tmp_path / "info.json"
    model, changes = lowrank.auto_decomposition(model_of_two_convs(), info, latency=0.5, example_input=X)
    assert list(changes) == ["3"]  # "0" is measured slower whatever its rank
    document = json.loads(info.read_text())
    assert document["version"] == 2 and document["policy"]["rule"] == "latency=0.5"
    assert document["policy"]["measured_on"]["example_input_shapes"] == [[4, 16, 12, 12]]
    (layer,) = document["layers"]
    record = layer["latency"]
    assert record["target"] == 0.5 and record["input_shapes"] == [[4, 32, 10, 10]]
    assert record["decomposed_seconds"] <= 0.5 * record["dense_seconds"]
    assert {"ranks": layer["ranks"], "seconds": record["decomposed_seconds"]} in record["probes"]
    # The largest rank within the budget: one more would not fit this clock.
    conv, spatial = model_of_two_convs()[3], METHODS["spatial"]
    candidates = RankPolicy(latency=0.5, example_input=X).candidate_ranks(spatial, conv)
    larger = candidates[candidates.index(tuple(layer["ranks"])) + 1]
    replacement = nn.Sequential(*(nn.Conv2d(**spec["args"]) for spec in spatial.specs(conv, larger)))
    assert fake_seconds(replacement, [InputSpec.of(torch.empty(4, 32, 10, 10))]) > 0.5 * record["dense_seconds"]
    skipped = {entry["name"]: entry for entry in document["skipped"]}
    assert skipped["0"]["reason"].startswith("no rank is measured within latency=0.5 of the dense layer's time")
    assert skipped["0"]["latency"]["decomposed_seconds"] is None and skipped["0"]["latency"]["probes"]
    assert any(line.startswith("Measured: '3': rank") for line in lowrank_log)


def test_a_replacement_fast_only_once_is_not_kept(monkeypatch, lowrank_log):
    dense_timings = []

    def clock(module, inputs):  # the dense layer takes 1 s; replacements 0.1 s, 2 s once timed again
        if isinstance(module, nn.Conv2d):
            dense_timings.append(1.0)
            return 1.0
        return 0.1 if len(dense_timings) < 2 else 2.0

    monkeypatch.setattr(latency, "seconds", clock)
    model = nn.Sequential(nn.Conv2d(32, 32, 3))
    _, changes = lowrank.auto_decomposition(model, latency=0.5, example_input=torch.randn(1, 32, 8, 8))
    assert not changes and len(dense_timings) == 2
    reason = "was measured within latency=0.5 of the dense layer's time, but not when timed again"
    assert any(reason in line for line in lowrank_log)


def test_replay_reproduces_the_structure_without_timing(fake_clock, tmp_path, monkeypatch):
    info = tmp_path / "info.json"
    decomposed, _ = lowrank.auto_decomposition(model_of_two_convs(), info, latency=0.5, example_input=X)
    monkeypatch.setattr(latency, "seconds", no_clock)
    monkeypatch.setattr(latency, "fastest_seconds", no_clock)
    rebuilt, changes = lowrank.decompose_network(model_of_two_convs(), info)
    assert list(changes) == ["3"]
    rebuilt.load_state_dict(decomposed.state_dict())  # strict: same structure
    rebuilt.eval(), decomposed.eval()
    assert torch.equal(rebuilt(X), decomposed(X))


def test_from_latency_and_per_layer_rules(fake_clock):
    model = model_of_two_convs()
    decomposed = lowrank.Decompose(model, method="spatial").from_latency(0.5, X, divisor=1).decompose_network()
    assert isinstance(decomposed[3], nn.Sequential) and isinstance(model[3], nn.Conv2d)
    fake_clock.clear()
    _, changes = lowrank.auto_decomposition(
        model_of_two_convs(), layers={"0": {"rank": 8}, "3": {"latency": 0.5}}, example_input=X
    )
    assert list(changes) == ["0", "3"]  # a fixed rank is not timed
    assert all(not isinstance(module, nn.Sequential) or module[0].in_channels == 32 for module in fake_clock)


def test_a_layer_the_example_does_not_reach_is_left_alone(fake_clock, lowrank_log):
    model = nn.ModuleDict({"used": nn.Conv2d(16, 32, 3), "unused": nn.Conv2d(16, 32, 3)})
    model.forward = lambda x: model["used"](x)
    lowrank.auto_decomposition(model, latency=0.9, example_input=X)
    assert "Skip: 'unused': not called when the model runs on example_input, so its latency cannot be measured" in (
        lowrank_log
    )


def test_meta_weights_cannot_be_timed():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, device="meta"))
    with pytest.raises(ValueError, match="example_input: .0. has its weights on the meta device, where the model"):
        lowrank.auto_decomposition(model, latency=0.5, example_input=torch.randn(1, 16, 8, 8))


def test_structure_only_builds_refuse_timings(fake_clock):
    decomposer = lowrank.Decompose(model_of_two_convs()).from_latency(0.5, X)
    with pytest.raises(ValueError, match="timings, which differ between processes: save the deciding process's ranks"):
        decomposer.decompose_network(do_decompose_weight=False)
    assert fake_clock == []


def test_a_config_file_gives_other_processes_the_timed_ranks(fake_clock, tmp_path):
    config = tmp_path / "ranks.json"
    timed = lowrank.Decompose(model_of_two_convs(), config_file=config).from_latency(0.5, X, divisor=1)
    timings = len(fake_clock)
    decomposed = timed.decompose_network()
    structure = lowrank.Decompose(model_of_two_convs(), config_file=config).from_file()
    structure = structure.decompose_network(do_decompose_weight=False)
    assert len(fake_clock) == timings  # timed once, when the ranks were chosen
    assert {k: v.shape for k, v in structure.state_dict().items()} == {
        k: v.shape for k, v in decomposed.state_dict().items()
    }


class LazyHead(nn.Module):
    """A lazy layer gets its weights during the capture run; a broadcast query feeds a Linear."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 4, 16))
        self.proj = nn.Linear(16, 16)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(self.proj(self.query.expand(x.shape[0], -1, -1)) + x)


class KeywordsOnly(nn.Module):  # as Hugging Face models take a tokenizer's output: model(**inputs)
    def __init__(self):
        super().__init__()
        self.body = model_of_two_convs()

    def forward(self, *, pixel_values):
        return self.body(pixel_values)


def test_the_example_input_may_be_keyword_arguments(fake_clock, tmp_path):
    info = tmp_path / "info.json"
    _, changes = lowrank.auto_decomposition(KeywordsOnly(), info, latency=0.5, example_input={"pixel_values": X})
    assert list(changes) == ["body.3"]
    assert json.loads(info.read_text())["policy"]["measured_on"]["example_input_shapes"] == [[4, 16, 12, 12]]


def test_capture_leaves_a_trainable_model_and_samples_broadcast_inputs():
    model = LazyHead().train()
    calls = observe(model, torch.randn(2, 4, 16), {"proj": model.proj}).inputs
    (spec,) = calls["proj"]
    assert spec.stride[0] == 0 and spec.sample().shape == (2, 4, 16)
    assert not model.head.weight.is_inference()
    model(torch.randn(2, 4, 16)).sum().backward()  # inference tensors would refuse this
    assert model.head.weight.grad is not None


def test_timing_leaves_the_random_state_alone(monkeypatch):
    monkeypatch.setattr(latency, "MIN_RUN_TIME", 0.001)
    model = model_of_two_convs()
    torch.manual_seed(1)
    _, changes = lowrank.auto_decomposition(model, latency=0.9, example_input=X, min_rank=1)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)  # default-initialised probes and sampled inputs drew nothing


def test_capture_records_every_call_and_restores_the_model():
    model = model_of_two_convs().train()
    model[1].register_forward_hook(lambda *args: None)
    statistics = model[1].running_mean.clone()
    x = X.contiguous(memory_format=torch.channels_last)
    calls = observe(model, x, {"0": model[0], "3": model[3]}).inputs
    assert calls["0"] == [InputSpec((4, 16, 12, 12), x.stride(), torch.float32, torch.device("cpu"))]
    assert calls["3"][0].shape == (4, 32, 10, 10)
    assert calls["0"][0].sample().is_contiguous(memory_format=torch.channels_last)
    assert all(module.training for module in model.modules())
    assert torch.equal(model[1].running_mean, statistics)  # nothing learnt
    assert not model[0]._forward_pre_hooks and len(model[1]._forward_hooks) == 1


def test_real_timings_keep_only_faster_replacements(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(model, info, latency=0.8, example_input=torch.randn(2, 32, 16, 16), divisor=8)
    document = json.loads(info.read_text())
    assert document["policy"]["measured_on"]["torch_threads"] == torch.get_num_threads()
    for layer in document["layers"]:
        record = layer["latency"]
        assert record["decomposed_seconds"] < record["dense_seconds"]
        assert record["decomposed_seconds"] <= 0.8 * record["dense_seconds"]
        assert all(rank % 8 == 0 for rank in layer["ranks"])
    for entry in document["skipped"]:  # too slow, or not confirmed when timed again
        assert "measured within latency=0.8 of the dense layer's time" in entry["reason"]
    rebuilt, _ = lowrank.decompose_network(
        nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)), info
    )
    assert [name for name, module in rebuilt.named_children() if isinstance(module, nn.Sequential)] == [
        layer["name"] for layer in document["layers"]
    ]


def test_real_timings_keep_a_layer_much_cheaper_decomposed(tmp_path):
    # A 2048x2048 Linear on 256 rows, whose only candidate at divisor 512 is rank 512: half the work,
    # measured well within latency=0.9 (the rule takes the largest candidate within its budget, which
    # is otherwise close to it; and the test above may keep nothing where small convs are overhead).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    info = tmp_path / "info.json"
    decomposed, changes = lowrank.auto_decomposition(
        model, info, latency=0.9, example_input=torch.randn(256, 2048), exclude="2", divisor=512
    )
    assert list(changes) == ["0"]
    (layer,) = json.loads(info.read_text())["layers"]
    assert layer["ranks"] == [512]
    assert layer["latency"]["decomposed_seconds"] <= 0.9 * layer["latency"]["dense_seconds"]
    rebuilt, _ = lowrank.decompose_network(nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)), info)
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [tuple(p.shape) for p in decomposed.parameters()]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(latency=0.5), "latency needs example_input="),
        (dict(layers={"3": {"latency": 0.5}}), "latency needs example_input="),
        (dict(latency=2, example_input=X), r"latency must be a number in \(0, 1\] \(the fraction of the dense layer's"),
        (dict(latency=0.5, ratio=0.3, example_input=X), "give at most one of rank, ratio, energy, vbmf, latency"),
        (dict(latency=0.5, example_input=torch.randn(1, 3, 8, 8)), "example_input: the model does not run on it"),
    ],
)
def test_bad_latency_options_name_the_problem(options, message, fake_clock):
    with pytest.raises(ValueError, match=message):
        lowrank.auto_decomposition(model_of_two_convs(), **options)


def test_version_1_info_files_still_load(net, tmp_path):
    """Version 1 files are version 2 files without the latency records: written before latency existed."""
    info = tmp_path / "info.json"
    decomposed, _ = lowrank.auto_decomposition(net, info, ratio=0.3)  # lowrank's info file, without timings
    document = json.loads(info.read_text())
    assert "latency" not in json.dumps(document)
    info.write_text(json.dumps({**document, "version": 1}))
    rebuilt, changes = lowrank.decompose_network(Net(), info)
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    rebuilt.load_state_dict(decomposed.state_dict())


def test_inspect_shows_the_measured_times(fake_clock, tmp_path, capsys):
    info = tmp_path / "info.json"
    lowrank.auto_decomposition(model_of_two_convs(), info, latency=0.5, example_input=X)
    assert main(["inspect", str(info)]) == 0
    out = capsys.readouterr().out
    (layer,) = json.loads(info.read_text())["layers"]
    record = layer["latency"]
    assert out.splitlines()[0].endswith("dense ms  decomposed ms  time ratio")
    row = next(line for line in out.splitlines() if line.startswith("3 "))
    dense_ms, decomposed_ms, time_ratio = row.split()[-3:]
    assert float(dense_ms) == pytest.approx(1e3 * record["dense_seconds"], abs=1e-3)
    assert float(decomposed_ms) == pytest.approx(1e3 * record["decomposed_seconds"], abs=1e-3)
    assert float(time_ratio) <= 0.5
    assert "times measured on cpu with" in out and "inputs [[4, 16, 12, 12]]" in out
    assert "skipped '0': no rank is measured within latency=0.5" in out
