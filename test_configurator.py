"""Tests of configurator.py's parsing of settings (no torch, no subprocess).   python -m pytest -q test_configurator.py"""
import pytest

from configurator import configure


def settings(**kw):
    """A script's globals: a few settings of each type."""
    return {"out_dir": "out", "start": "\n", "max_iters": 10, "muon_lr": 0.02, "eval_loops": (), "compile": False,
            "__file__": "/x/sample.py", **kw}


@pytest.mark.parametrize("text", ["1984", "None", "True", "3.5", "1,2", "[1]", 'he said "hi"', "'quoted'", "", "a=b"])
def test_a_str_setting_takes_the_text_as_typed(text):
    s = settings()
    configure(s, [f"--start={text}"])
    assert s["start"] == text


def test_other_types_are_still_parsed():
    s = settings()
    configure(s, ["--max_iters=100", "--muon_lr=1", "--eval_loops=1,2", "--compile=True"])
    assert (s["max_iters"], s["muon_lr"], s["eval_loops"], s["compile"]) == (100, 1.0, (1, 2), True)
    assert type(s["muon_lr"]) is float
    with pytest.raises(ValueError, match="'max_iters' expects int"):
        configure(settings(), ["--max_iters=abc"])
