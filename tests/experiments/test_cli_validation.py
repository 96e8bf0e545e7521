"""Every experiment's command line checks every argument before any work: a bad one exits with
status 2 and one line naming the flag, the value and what was expected, and nothing is written
(no model is built, so these are cheap)."""
import importlib
import re

import pytest

CASES = [
    ("convert_gpt2", ["--chunk-size", "0"], "--chunk-size: expected an int >= 1, got '0'"),
    ("convert_gpt2", ["--top-k", "-1"], "--top-k: expected an int >= 1, got '-1'"),
    ("convert_gpt2", ["--bsbr-bank", "1,1"], "--bsbr-bank: BankConfig.slots_per_level[0]"),
    ("convert_gpt2", ["--contexts", "-4"], "--contexts: expected a comma list of ints >= 1"),
    ("convert_gpt2", ["--finetune-frac", "0.5"], "--finetune-frac: expected a number in (0"),
    ("convert_gpt2", ["--steps", "0"], "--steps: expected an int >= 1, got '0'"),
    ("scaling", ["--lengths", "-5"], "--lengths: expected a comma list of ints >= 1, got '-5'"),
    ("scaling", ["--reps", "0"], "--reps: expected an int >= 1, got '0'"),
    ("scaling", ["--stream-chunk", "0"], "--stream-chunk: expected an int >= 1"),
    ("memory_wall", ["--time-budget-s", "-1"], "--time-budget-s: expected a number >= 0"),
    ("memory_wall", ["--deadline-s", "nan"], "--deadline-s: expected a number >= 0, got 'nan'"),
    ("memory_wall", ["--decode-steps", "0"], "--decode-steps: expected an int >= 1"),
    ("memory_wall", ["--rss-budget-gb", "0"], "--rss-budget-gb: expected a number > 0"),
    ("sparsity", ["--record-steps", "-5"], "--record-steps: expected a comma list of ints >= 0"),
    ("sparsity", ["--max-minutes", "-1"], "--max-minutes: expected a number >= 0"),
    ("bench_kernels", ["--shapes", "foo"], "--shapes: expected a comma list of bdh, k128"),
    ("bench_kernels", ["--fwd-mode", "both"], "--fwd-mode: expected one of auto, split, fused"),
    ("train", ["--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
    ("train", ["--eval-every", "0"], "--eval-every: expected an int >= 1"),
    ("bench_bdh", ["--checkpoint", "/missing.pt"],
     "--checkpoint: expected an existing file, got '/missing.pt'"),
    ("bench_sparse", ["--checkpoint", "/missing.pt"], "--checkpoint: expected an existing file"),
    ("bench_bsbr", ["--top-k", "0"], "--top-k: expected an int >= 1, got '0'"),
    ("bench_bsbr", ["--decode-lengths", "64,-1"], "--decode-lengths: expected a comma list"),
    ("gpt2_decode", ["--contexts", "0"], "--contexts: expected a comma list of ints >= 1"),
    ("long_range", ["--threshold", "0"], "--threshold: expected a number in (0, 1]"),
    ("long_range", ["--eval-lengths", "-4"], "--eval-lengths: expected a comma list of ints >= 4"),
    ("quality", ["--eval-every", "0"], "--eval-every: expected an int >= 1, got '0'"),
    ("quality", ["--models", "gpt3"], "--models: expected a comma list of bsbr, bdh, gpt2"),
]
MODULES = sorted({m for m, _, _ in CASES})


def run_main(module: str, argv: list[str]):
    return importlib.import_module(f"experiments.{module}").main(argv)


def expect_one_line(capsys, words: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err


@pytest.mark.parametrize("module, argv, words", CASES,
                         ids=[f"{m} {' '.join(a)}" for m, a, _ in CASES])
def test_a_bad_argument_stops_before_any_work(module, argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_main(module, argv + ["--out", str(out)])
    assert e.value.code == 2
    expect_one_line(capsys, words)
    assert not out.exists()                          # nothing written, not even an empty JSON


@pytest.mark.parametrize("module", MODULES)
def test_out_pointing_at_a_file_is_refused(module, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        run_main(module, ["--out", str(target)])
    assert e.value.code == 2
    expect_one_line(capsys, f"--out: expected a folder, got the file '{target}'")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("module", MODULES)
def test_an_unknown_flag_is_one_line(module, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(module, ["--no-such-flag", "1"])
    assert e.value.code == 2
    expect_one_line(capsys, "unrecognized arguments: --no-such-flag 1")


@pytest.mark.parametrize("module", MODULES)
def test_help_gives_every_flag_its_default(module, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(module, ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    flags = re.findall(r"^  (--[a-z][a-zA-Z-]*)", options, re.M)
    assert "--out" in flags and "None" not in text
    assert " ".join(options.split()).count("(default: ") == len(flags), flags
