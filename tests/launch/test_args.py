import argparse
import re

import pytest

from launch.args import (
    RunMode,
    add_decomposition_args,
    add_distill_args,
    add_distributed_args,
    add_output_args,
    check_mode_args,
    non_negative_int,
    policy_of,
    positive_float,
    positive_int,
    probability,
)
from launch.distributed import node_name
from launch.entry import RunError


def parse(*argv, **defaults):
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode="online", **defaults)
    return parser.parse_args(argv)


def test_the_rank_rule_flags_give_the_decomposition():
    # No rank flag: the seed's tool, as its sample calls it.
    assert policy_of(parse()) == {}  # AMCT's choice: auto_decomposition(model, path)
    assert policy_of(parse("--divisor", "1")) == {}  # no rounding: as good as not given
    msmodelslim = {"seed": "msmodelslim", "method": "tucker2", "ratio": 0.5}
    assert policy_of(parse(**msmodelslim)) == {"from_ratio": 0.5}  # Decompose(model).from_ratio(0.5)
    # Any rank flag: lowrank's rules, with the recipe's defaults for the others.
    assert policy_of(parse("--method", "tucker2")) == {"method": "tucker2", "ratio": 0.3}
    assert policy_of(parse("--divisor", "8", **msmodelslim)) == {"method": "tucker2", "divisor": 8, "ratio": 0.5}
    assert policy_of(parse("--ratio", "0.2")) == {"method": "spatial", "ratio": 0.2}
    assert policy_of(parse("--energy", "0.9", "--method", "tucker2")) == {"method": "tucker2", "energy": 0.9}
    assert policy_of(parse("--vbmf")) == {"method": "spatial", "vbmf": True}
    assert policy_of(parse("--divisor", "8")) == {"method": "spatial", "divisor": 8, "ratio": 0.3}
    example = object()  # the recipe's example input, on which the budget counts multiply-adds
    budget = {"method": "spatial", "budget": 0.3, "example_input": example}
    assert policy_of(parse("--budget", "0.3"), example) == budget
    sequential = parse("--budget", "0.3", "--calibration-batches", "2", "--sequential-calibration")
    assert policy_of(sequential, example) == budget | {"sequential": True}  # the barrier adds the batches


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "1.5"], "argument --ratio: must be a number in (0, 1], got '1.5'"),
        (["--energy", "0"], "argument --energy: must be a number in (0, 1], got '0'"),
        (["--energy", "most"], "argument --energy: must be a number in (0, 1], got 'most'"),
        (["--ratio", "0.5", "--vbmf"], "argument --vbmf: not allowed with argument --ratio"),
        (["--energy", "0.9", "--vbmf"], "argument --vbmf: not allowed with argument --energy"),
        (["--divisor", "0"], "argument --divisor: must be an integer >= 1, got '0'"),
        (["--budget", "0.3", "--ratio", "0.3"], "argument --ratio: not allowed with argument --budget"),
        (["--budget", "0"], "argument --budget: must be a number in (0, 1], got '0'"),
        (["--calibration-batches", "-1"], "argument --calibration-batches: must be an integer >= 0, got '-1'"),
    ],
)
def test_bad_rank_rule_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, good, bad, requirement",
    [
        (positive_int, {"1": 1, "32": 32}, ["0", "-3", "2.5", "x"], "an integer >= 1"),
        (non_negative_int, {"0": 0, "7": 7}, ["-1", "nan"], "an integer >= 0"),
        (positive_float, {"0.5": 0.5, "3600": 3600.0}, ["0", "-1", "nan", "inf"], "a positive number"),
        (probability, {"0": 0.0, "0.1": 0.1}, ["1", "-0.1", "nan"], "a number in [0, 1)"),
    ],
)
def test_numeric_flags_are_checked(kind, good, bad, requirement):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"must be {requirement}, got {text!r}")):
            kind(text)


def test_barrier_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        parse("--barrier-timeout", "-1")
    assert "argument --barrier-timeout: must be a positive number, got '-1'" in capsys.readouterr().err


def test_output_paths_that_cannot_be_written_are_named_before_any_work(tmp_path):
    pretrained = tmp_path / "dense.pth"
    pretrained.write_bytes(b"")
    a_file = tmp_path / "a_file"
    a_file.write_text("")

    def check(*argv):
        parser = argparse.ArgumentParser()
        add_decomposition_args(parser, run_mode="online")
        add_output_args(parser, output_dir=str(tmp_path / "out"))
        args = parser.parse_args(["--pretrained-path", str(pretrained), *argv])
        with pytest.raises(RunError) as stopped:
            check_mode_args(args)
        return str(stopped.value)

    assert check("--output-dir", str(a_file)) == f"--output-dir {a_file} is a file"
    assert (
        check("--save-path", str(a_file / "w.pth"))
        == f"--save-path {a_file / 'w.pth'}: {a_file} is a file, not a folder"
    )
    (tmp_path / "folder").mkdir()
    assert check("--save-path", str(tmp_path / "folder")) == f"--save-path {tmp_path / 'folder'} is a folder"
    assert check("--decompose-info-path", str(a_file / "x" / "info.json")).startswith("--decompose-info-path")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # where the first checkpoint would go, hours later
    assert check("--output-dir", str(tmp_path / "run")) == (
        f"--output-dir: {tmp_path / 'run' / 'checkpoints'} is a file"
    )
    # A folder that refuses new files (root ignores permissions; /proc refuses it too)
    assert check("--save-path", "/proc/final.pth").startswith(
        "--save-path /proc/final.pth: cannot create files in /proc ("
    )


def test_decomposition_flags_without_tensor_decompose_are_refused(tmp_path):
    """The AMCT sample: --run-mode and the artifact paths must come with --tensor-decompose."""

    def check(*argv, run_mode=None):
        parser = argparse.ArgumentParser()
        add_decomposition_args(parser, run_mode=run_mode)
        add_output_args(parser, output_dir=str(tmp_path / "out"))
        args = parser.parse_args(argv)
        try:
            return check_mode_args(args).mode
        except RunError as stopped:
            return str(stopped)

    assert check("--run-mode", "offline") == (
        "--run-mode need(s) --tensor-decompose; without it the run trains the dense model"
    )
    assert check("--decompose-info-path", "i.json").startswith("--decompose-info-path need(s)")
    assert check() == "baseline"
    pretrained = tmp_path / "dense.pth"
    pretrained.write_bytes(b"")
    assert check("--tensor-decompose", "--pretrained-path", str(pretrained)) == "online"
    assert check("--pretrained-path", str(pretrained), run_mode="online") == "online"


@pytest.mark.parametrize(
    "run_mode, argv, message",
    [
        (None, ["--ratio", "0.5"], "--ratio need(s) --tensor-decompose; without it the run trains the dense"),
        (None, ["--vbmf", "--method", "tucker2"], "--method, --vbmf need(s) --tensor-decompose"),
        ("offline", ["--energy", "0.9"], "--energy: not used offline, where the structure and the weights"),
        ("offline", ["--divisor", "8"], "--divisor: not used offline"),
        ("offline", ["--pretrained-path", "{pretrained}", "--method", "svd"], "--method, --pretrained-path:"),
        ("offline", ["--ratio", "0.3"], "--ratio: not used offline"),  # lowrank's rules, given
        ("offline", ["--divisor", "1"], None),  # the default, given: changes nothing
        ("online", ["--pretrained-path", "{pretrained}", "--energy", "0.9"], None),
        (None, ["--calibration-batches", "2", "--ratio", "0.3"], "--ratio, --calibration-batches need(s) --tensor"),
        ("offline", ["--budget", "0.3", "--calibration-batches", "2"], "--budget, --calibration-batches: not used"),
        ("online", ["--pretrained-path", "{pretrained}", "--budget", "0.3", "--calibration-batches", "8"], None),
        # AMCT's choice, the MNIST recipes' default, has no data-aware form: a rank flag must say which rules.
        ("online", ["--pretrained-path", "{pretrained}", "--calibration-batches", "8"], "--calibration-batches: AMCT"),
        ("online", ["--pretrained-path", "{pretrained}", "--ratio", "0.3", "--sequential-calibration"], "--sequential"),
        (
            "online",
            ["--pretrained-path", "{pretrained}", "--calibration-batches", "8", "--sequential-calibration"],
            "--seq",
        ),
        ("offline", ["--sequential-calibration"], "--sequential-calibration: not used offline"),
        ("offline", ["--ratio", "0.3", "--calibration-batches", "2", "--sequential-calibration"], "--ratio, --calib"),
        (
            "online",
            [
                "--pretrained-path",
                "{pretrained}",
                "--ratio",
                "0.3",
                "--calibration-batches",
                "2",
                "--sequential-calibration",
            ],
            None,
        ),
    ],
)
def test_flags_the_mode_would_ignore_are_refused(tmp_path, run_mode, argv, message):
    """Offline the info file gives the ranks and the weights, without --tensor-decompose nothing is
    decomposed: a rank rule or pretrained weights given there would silently change nothing."""
    pretrained, info, weights = tmp_path / "dense.pth", tmp_path / "info.json", tmp_path / "w.pth"
    for path in (pretrained, info, weights):
        path.write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode=run_mode)
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    paths = ["--decompose-info-path", str(info), "--decomposed-weights-path", str(weights)]
    argv = [arg.format(pretrained=pretrained) for arg in argv] + (paths if run_mode == "offline" else [])
    args = parser.parse_args(argv)
    if message is None:
        assert check_mode_args(args).mode == run_mode
    else:
        with pytest.raises(RunError) as stopped:
            check_mode_args(args)
        assert str(stopped.value).startswith(message)


def test_the_two_artifacts_cannot_be_one_file(tmp_path):
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode="offline")
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    same = tmp_path / "same"
    same.write_text("")
    args = parser.parse_args(["--decompose-info-path", str(same), "--decomposed-weights-path", f"{tmp_path}/./same"])
    with pytest.raises(RunError) as stopped:
        check_mode_args(args)
    assert str(stopped.value) == (
        f"--decompose-info-path and --decomposed-weights-path are the same file {same}: give each its own"
    )


def online_args(tmp_path, *argv):
    """The flags of an online run, parsed: ``argv``, with pretrained weights in ``tmp_path`` and
    ``--output-dir tmp_path/out``."""
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode="online")
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    pretrained = tmp_path / "dense.pth"
    pretrained.write_bytes(b"")
    return parser.parse_args(["--pretrained-path", str(pretrained), *argv])


def test_an_artifact_inside_another_is_refused(tmp_path):
    """Rank 0 would write the info file, then fail to save the weights under it, as under a folder."""
    info = tmp_path / "info"
    args = online_args(tmp_path, "--decompose-info-path", str(info), "--decomposed-weights-path", f"{info}/w.pth")
    with pytest.raises(RunError) as stopped:
        check_mode_args(args)
    assert str(stopped.value) == (
        f"--decompose-info-path {info} and --decomposed-weights-path {info}/w.pth: one lies inside the other: "
        "give each its own"
    )
    assert not info.exists()


@pytest.mark.parametrize(
    "run_mode, argv, flags",
    [
        ("online", ["--save-path", "{out}/decomposed_weights.pth"], "--decomposed-weights-path and --save-path"),
        ("online", ["--decompose-info-path", "{pretrained}"], "--pretrained-path and --decompose-info-path"),
        ("offline", ["--save-path", "{out}/../out/w.pth"], "--decomposed-weights-path and --save-path"),
    ],
)
def test_the_save_path_and_the_artifacts_cannot_be_an_input(tmp_path, run_mode, argv, flags):
    """The run would write over its pretrained weights or its decomposition's files, and lose them."""
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode=run_mode)
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    pretrained = tmp_path / "dense.pth"
    for path in (pretrained, tmp_path / "info.json", tmp_path / "out" / "w.pth"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    paths = ["--pretrained-path", str(pretrained)]
    if run_mode == "offline":
        paths = [
            "--decompose-info-path",
            str(tmp_path / "info.json"),
            "--decomposed-weights-path",
            f"{tmp_path}/out/w.pth",
        ]
    args = parser.parse_args([*paths, *(arg.format(out=tmp_path / "out", pretrained=pretrained) for arg in argv)])
    with pytest.raises(RunError, match=f"{flags} are the same file .*: give each its own"):
        check_mode_args(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--save-path", "{out}"], "--save-path {out} is --output-dir or holds it"),
        (["--save-path", "{out}/"], "--save-path {out} is --output-dir or holds it"),
        (["--save-path", "{out}/.."], "--save-path {out_parent} is --output-dir or holds it"),
        (["--save-path", "{out}/checkpoints"], "--save-path {out}/checkpoints is where --output-dir keeps its checkp"),
        (
            ["--save-path", "{out}/results.json"],
            "--save-path {out}/results.json is where --output-dir keeps its results",
        ),
        (["--pretrained-path", "{out}/checkpoints/step_3/model.pth"], "--pretrained-path {out}/checkpoints/step_3"),
        (["--save-path", "{out}/final.pth"], None),  # as the README does
    ],
)
def test_files_cannot_take_the_output_dirs_places(tmp_path, argv, message):
    """Found before training, not when the run saves at its end (or moves checkpoints/ aside at its start)."""
    out = tmp_path / "runs" / "out"
    (out / "checkpoints" / "step_3").mkdir(parents=True)
    (out / "checkpoints" / "step_3" / "model.pth").write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser)
    add_output_args(parser, output_dir=str(out))
    args = parser.parse_args([a.format(out=out) for a in argv])
    if message is None:
        assert check_mode_args(args).mode == "baseline"
    else:
        with pytest.raises(RunError) as stopped:
            check_mode_args(args)
        assert str(stopped.value).startswith(f"{message.format(out=out, out_parent=out.parent)}")


def test_a_baseline_may_train_its_pretrained_weights_in_place(tmp_path):
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser)
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    pretrained = tmp_path / "dense.pth"
    pretrained.write_bytes(b"")
    args = parser.parse_args(["--pretrained-path", str(pretrained), "--save-path", str(pretrained)])
    assert check_mode_args(args).mode == "baseline"


def parse_distributed(*argv):
    parser = argparse.ArgumentParser()
    add_distributed_args(parser)
    return parser.parse_args(argv)


def test_the_amct_distributed_flags_are_accepted():
    """The AMCT sample's ddp_train.py flags, under both spellings; torch.distributed.launch passes
    --local-rank=N before the script's own flags."""
    defaults = parse_distributed()
    assert (defaults.backend, defaults.init_method, defaults.local_rank) == (None, "env://", None)
    args = parse_distributed("--local-rank=1", "--backend", "nccl", "--init_method", "tcp://10.0.0.1:23456")
    assert (args.backend, args.init_method, args.local_rank) == ("nccl", "tcp://10.0.0.1:23456", 1)
    assert parse_distributed("--local_rank", "3", "--init-method", "file:///shared/pg").local_rank == 3
    assert parse_distributed("--init-method", "file://localhost/shared/pg").init_method == "file://localhost/shared/pg"
    # The sample's "--local_rank 0" after the launcher's --local-rank=1: accepted, LOCAL_RANK decides.
    assert parse_distributed("--local-rank=1", "--local_rank", "0").local_rank == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "mpi"], "argument --backend: invalid choice: 'mpi'"),
        (["--local-rank=-1"], "argument --local-rank/--local_rank: must be an integer >= 0, got '-1'"),
        (["--init-method", "tcp://10.0.0.1"], "argument --init-method/--init_method: must be env://, tcp://HOST:PORT"),
        (["--init_method", "tcp://host:port"], "got 'tcp://host:port'"),
        (["--init-method", "env://host"], "got 'env://host'"),
        (["--init-method", "file://"], "got 'file://'"),
        (["--init-method", "localhost:29500"], "got 'localhost:29500'"),
        (["--init-method", "tcp://10.0.0.1:23456?rank=0&world_size=2"], "without rank or world_size"),
        (["--init-method", "tcp://10.0.0.1:23456?rank"], "without rank or world_size"),
        (["--init-method", "tcp://10.0.0.1:23456#x"], "got 'tcp://10.0.0.1:23456#x'"),
        (["--init-method", "file://shared/pg"], "got 'file://shared/pg'"),  # torch would read /pg
    ],
)
def test_bad_distributed_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_distributed(*argv)
    assert message in capsys.readouterr().err


def test_the_distributed_flags_show_their_default():
    parser = argparse.ArgumentParser()
    add_distributed_args(parser)
    helps = {action.dest: action.help for action in parser._actions if action.dest != "help"}
    assert set(helps) == {"backend", "init_method", "local_rank"}
    assert helps["backend"].endswith("(default: gloo on the CPU, nccl with --use-gpu)")
    assert helps["init_method"].endswith("(default: env://)")
    assert "LOCAL_RANK" in helps["local_rank"] and helps["local_rank"].endswith("(default: None)")


def test_the_mode_and_its_files_are_returned_and_the_flags_left_as_they_are(tmp_path):
    args = online_args(tmp_path)
    given = dict(vars(args))
    run = check_mode_args(args)
    assert vars(args) == given  # a config comes back; the namespace is not changed
    out = tmp_path / "out"
    assert run == RunMode("online", str(out / "decompose_info.json"), str(out / "decomposed_weights.pth"))
    assert run.settings()["run_mode"] == "online"
    assert RunMode("baseline").settings() == {
        "run_mode": None,
        "decompose_info_path": None,
        "decomposed_weights_path": None,
        "distill": False,
        "distill_alpha": None,
        "distill_temperature": None,
    }


def test_each_rank_checks_the_input_files_it_reads_and_names_its_node(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.pth")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # online, only rank 0 reads the pretrained weights: its node alone needs them
    assert check_mode_args(online_args(tmp_path, "--pretrained-path", missing)).mode == "online"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunError, match=f"^--pretrained-path {missing} does not exist on {node_name()}$"):
        check_mode_args(online_args(tmp_path, "--pretrained-path", missing))
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode="offline")
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    args = parser.parse_args(["--decompose-info-path", missing, "--decomposed-weights-path", missing])
    monkeypatch.setenv("RANK", "1")  # offline, every rank reads both files
    with pytest.raises(RunError, match=f"^--decompose-info-path {missing} does not exist on {node_name()}$"):
        check_mode_args(args)


def distill_args(tmp_path, *argv, run_mode="online"):
    """``argv`` parsed by a recipe's parser with the distillation flags (and the ImageNet recipe's
    ``--weights`` and ``--test-only``); ``{pretrained}``, ``{info}`` and ``{weights}`` are (empty) files in
    ``tmp_path``."""
    files = {name: tmp_path / f"{name}.pth" for name in ("pretrained", "info", "weights")}
    for path in files.values():
        path.write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode=run_mode)
    add_output_args(parser, output_dir=str(tmp_path / "out"))
    add_distill_args(parser)
    parser.add_argument("--weights")
    parser.add_argument("--test-only", action="store_true")
    return parser.parse_args([arg.format(**files) for arg in argv])


def test_distillation_settings_are_resolved_into_the_run_mode(tmp_path):
    run = check_mode_args(distill_args(tmp_path, "--pretrained-path", "{pretrained}", "--distill"))
    assert (run.distill, run.distill_alpha, run.distill_temperature) == (True, 0.5, 4.0)
    assert run.settings()["distill_alpha"] == 0.5  # recorded by checkpoints as the run used it
    argv = ["--pretrained-path", "{pretrained}", "--distill", "--distill-alpha", "1", "--distill-temperature", "2"]
    run = check_mode_args(distill_args(tmp_path, *argv))
    assert (run.distill_alpha, run.distill_temperature) == (1.0, 2.0)
    assert not check_mode_args(distill_args(tmp_path, "--pretrained-path", "{pretrained}")).distill
    # Offline, --pretrained-path is the teacher: accepted with --distill, refused without it.
    offline = ["--decompose-info-path", "{info}", "--decomposed-weights-path", "{weights}", "--pretrained-path"]
    run = check_mode_args(distill_args(tmp_path, *offline, "{pretrained}", "--distill", run_mode="offline"))
    assert (run.mode, run.distill) == ("offline", True)
    with pytest.raises(RunError, match="^--pretrained-path: not used offline"):
        check_mode_args(distill_args(tmp_path, *offline, "{pretrained}", run_mode="offline"))
    # A recipe's other source of the weights (the ImageNet recipe's --weights) gives a teacher too.
    args = distill_args(tmp_path, *offline[:-1], "--weights", "IMAGENET1K_V2", "--distill", run_mode="offline")
    assert check_mode_args(args, pretrained="weights").distill


@pytest.mark.parametrize(
    "run_mode, argv, message",
    [
        ("online", ["--distill-alpha", "0.3"], "--distill-alpha need(s) --distill; without it"),
        (
            "online",
            ["--distill-temperature", "2", "--distill-alpha", "0.5"],
            "--distill-alpha, --distill-temperature need(s) --distill",
        ),
        (None, ["--distill"], "--distill needs --tensor-decompose: the student is the decomposed model"),
        ("offline", ["--distill"], "--distill needs --pretrained-path: the dense pretrained model is the teacher"),
        ("online", ["--distill", "--test-only"], "--distill: not used with --test-only"),
    ],
)
def test_distillation_flags_that_cannot_be_used_are_refused(tmp_path, run_mode, argv, message):
    files = (
        ["--decompose-info-path", "{info}", "--decomposed-weights-path", "{weights}"] if run_mode == "offline" else []
    )
    pretrained = ["--pretrained-path", "{pretrained}"] if run_mode == "online" else []
    args = distill_args(tmp_path, *pretrained, *files, *argv, run_mode=run_mode)
    with pytest.raises(RunError) as stopped:
        check_mode_args(args)
    assert str(stopped.value).startswith(message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--distill-alpha", "1.5"], "argument --distill-alpha: must be a number in [0, 1], got '1.5'"),
        (["--distill-alpha", "nan"], "argument --distill-alpha: must be a number in [0, 1], got 'nan'"),
        (["--distill-temperature", "0"], "argument --distill-temperature: must be a positive number, got '0'"),
    ],
)
def test_bad_distillation_flags_are_named(argv, message, capsys):
    parser = argparse.ArgumentParser()
    add_distill_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_distillation_flags_show_their_default():
    parser = argparse.ArgumentParser()
    add_distill_args(parser)
    helps = {action.dest: action.help for action in parser._actions if action.dest != "help"}
    assert helps["distill"].endswith("(default: off)")
    assert helps["distill_alpha"].endswith("(default: 0.5)")
    assert helps["distill_temperature"].endswith("(default: 4.0)")


def test_every_rank_of_a_distilling_run_needs_the_teacher(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.pth")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # online, rank 1 reads the pretrained weights only as the teacher
    assert check_mode_args(distill_args(tmp_path, "--pretrained-path", missing)).mode == "online"
    with pytest.raises(RunError, match=f"^--pretrained-path {missing} does not exist on {node_name()}$"):
        check_mode_args(distill_args(tmp_path, "--pretrained-path", missing, "--distill"))
