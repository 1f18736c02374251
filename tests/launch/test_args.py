import argparse

import pytest

from launch.args import add_decomposition_args, policy_of


def parse(*argv, **defaults):
    parser = argparse.ArgumentParser()
    add_decomposition_args(parser, run_mode="online", **defaults)
    return parser.parse_args(argv)


def test_the_rank_rule_flags_give_auto_decomposition_keywords():
    assert policy_of(parse()) == {"method": "spatial", "ratio": 0.3}
    assert policy_of(parse(method="tucker2", ratio=0.5)) == {"method": "tucker2", "ratio": 0.5}
    assert policy_of(parse("--ratio", "0.2")) == {"method": "spatial", "ratio": 0.2}
    assert policy_of(parse("--energy", "0.9", "--method", "tucker2")) == {"method": "tucker2", "energy": 0.9}
    assert policy_of(parse("--vbmf")) == {"method": "spatial", "vbmf": True}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "1.5"], "argument --ratio: must be a number in (0, 1], got '1.5'"),
        (["--energy", "0"], "argument --energy: must be a number in (0, 1], got '0'"),
        (["--energy", "most"], "argument --energy: must be a number in (0, 1], got 'most'"),
        (["--ratio", "0.5", "--vbmf"], "argument --vbmf: not allowed with argument --ratio"),
        (["--energy", "0.9", "--vbmf"], "argument --vbmf: not allowed with argument --energy"),
    ],
)
def test_bad_rank_rule_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err
