"""Tests of configurator.py's parsing of settings and its tables (no torch, no subprocess).   python -m pytest -q test_configurator.py"""
import pytest

from configurator import configure, datasheet_peak, script_settings


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
    one = settings(exit_thresholds=())
    configure(one, ["--eval_loops=4", "--exit_thresholds=0.5"])  # one value is a tuple of one
    assert (one["eval_loops"], one["exit_thresholds"]) == ((4,), (0.5,))
    with pytest.raises(ValueError, match="'max_iters' expects int"):
        configure(settings(), ["--max_iters=abc"])


@pytest.mark.parametrize("arg,message", [
    ("--max_iter=100", "unknown config key 'max_iter' (command line): did you mean max_iters?"),
    ("--outdir=x", "unknown config key 'outdir' (command line): did you mean out_dir?"),
    ("--zzz=1", "unknown config key 'zzz' (command line): python sample.py --help lists every setting"),
    ("--os=1", "unknown config key 'os' (command line)"),  # a module among the globals is no setting
    ("--LIMIT=1", "unknown config key 'LIMIT' (command line)"),  # nor is a CONSTANT
])
def test_unknown_key_suggests_the_closest_setting(arg, message):
    import os
    s = settings(os=os, LIMIT=3)
    with pytest.raises(ValueError) as e:
        configure(s, [arg])
    assert str(e.value).startswith(message), str(e.value)
    assert s["os"] is os and s["LIMIT"] == 3


def test_unknown_key_in_a_config_file_suggests_too(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("max_iters = 5\nmuon_lrr = 0.01\n")
    with pytest.raises(ValueError) as e:
        configure(settings(), [str(path)])
    assert str(e.value) == f"unknown config key 'muon_lrr' ({path}): did you mean muon_lr?"


def test_a_folder_is_no_config_file(tmp_path):
    (tmp_path / "a.py").write_text("max_iters = 5\n")
    (tmp_path / "tiny.py").write_text("max_iters = 5\n")
    with pytest.raises(ValueError) as e:
        configure(settings(), [str(tmp_path)])
    assert str(e.value) == f"{tmp_path} is a folder, not a config file: name a file in it, e.g. {tmp_path / 'tiny.py'}"


@pytest.mark.parametrize("content,words", [(b"\x80\x02binary", "{} is not a config file: not UTF-8 text"),
                                           (b"PK\x03\x04\x00\x00", "config file {}: SyntaxError"),
                                           (b"max_iters = 5\nx = 1 / 0\n", "config file {} line 2: ZeroDivisionError")])
def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, content, words):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        configure(settings(), [str(path)])
    assert str(e.value).startswith(words.format(path)), str(e.value)


def test_a_script_without_config_files_points_at_out_dir(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    (tmp_path / "run.py").write_text("max_iters = 5\nout_dir = 'out/run'\n")
    (tmp_path / "other.py").write_text("max_iters = 5\n")
    want = "sample.py takes no config file: point it at a run with --out_dir="
    for arg, run in [(tmp_path, tmp_path), (tmp_path / "ckpt.pt", tmp_path), ("out/nope", "out/nope"),
                     (tmp_path / "run.py", f"out/run (the out_dir {tmp_path / 'run.py'} sets)"),
                     (tmp_path / "other.py", "DIR")]:
        with pytest.raises(ValueError) as e:
            configure(settings(), [str(arg)], config_files=False)
        assert str(e.value) == f"{want}{run}"


@pytest.mark.parametrize("name,dtype,peak", [("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
                                             ("NVIDIA H100 PCIe", "float16", 756e12), ("NVIDIA H200 NVL", "bfloat16", 835e12),
                                             ("NVIDIA GH200 480GB", "bfloat16", 989e12), ("NVIDIA H200", "float32", 0.0),
                                             ("NVIDIA GeForce RTX 3090", "bfloat16", 0.0)])
def test_datasheet_peak_knows_the_h200_and_the_variants_first(name, dtype, peak):
    # it knew only "H100" before: an H200 run logged MFU n/a; a PCIe part must not get the SXM number
    assert datasheet_peak(name, dtype) == peak


def test_help_keeps_a_comment_that_goes_on_below_its_setting(tmp_path):
    """--help showed only a long comment's first line, cut mid-sentence (sample.py's exit_threshold)."""
    path = tmp_path / "script.py"
    path.write_text("# section\n"
                    "a = 1                # the first line of a long comment,\n"
                    "                     # and its second line\n"
                    "# another section\n"
                    "b = 'x'              # short\n"
                    "c = 2\n"
                    "                     # not a continuation: c has no comment of its own\n")
    assert script_settings(str(path)) == [("a", "1", "the first line of a long comment, and its second line", "section"),
                                          ("b", "'x'", "short", "another section"), ("c", "2", "", None)]


@pytest.mark.parametrize("key,words", [("learning_rate", ["muon_lr", "adam_lr"]), ("min_lr", ["min_lr_frac"]),
                                       ("gradient_accumulation_steps", ["total_batch_size"])])
def test_nanogpts_names_point_at_ours(key, words):
    s = settings(muon_lr=0.02, adam_lr=8e-3, min_lr_frac=0.0, total_batch_size=512, train_gate=False)
    with pytest.raises(ValueError) as e:
        configure(s, [f"--{key}=1"])
    assert f"nanoGPT's {key} is" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert "train_gate" not in str(e.value)  # what difflib would have suggested for learning_rate


def test_given_records_where_each_key_was_set_and_the_command_line_stays(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("max_iters = 7\nmuon_lr = 0.5\n")
    s, given = settings(), {}
    configure(s, ["--max_iters=5", str(cfg)], given=given)  # a file after the flag still sets its value ...
    assert s["max_iters"] == 7 and given == {"max_iters": "command line", "muon_lr": str(cfg)}  # ... not its source
