"""The command line as a user meets it: help, inspect, export, and one-sentence errors."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import TEACHERS
from datafree.cli import main

SHIPPED = sorted(TEACHERS.glob("*.safetensors"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "datafree.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


class StartedAhead:
    """Command lines that each run in a process of their own, as a user runs them, one after another from the start of
    this file's tests, beside the tests that run in this process (most of such a process is its start: python, torch)."""

    def __init__(self, arg_lists, at_once: int = 1):
        import concurrent.futures

        self.pool = concurrent.futures.ThreadPoolExecutor(at_once)
        self.runs = {self._key(args): self.pool.submit(run_cli, *args) for args in arg_lists}

    @staticmethod
    def _key(args) -> tuple[str, ...]:
        return tuple(map(str, args))

    def result(self, *args) -> subprocess.CompletedProcess:
        return self.runs[self._key(args)].result()

    def stop(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


# every command and subcommand, with options a user looks for in its help
COMMANDS = {
    "teacher train": ["--dataset", "--arch", "--epochs", "--out", "--overwrite"],
    "teacher inspect": ["--arch", "--dataset", "--input-spec", "--json"],
    "teacher export": ["--to", "--input-spec", "--overwrite"],
    "distill": ["--teacher", "--student", "--preset", "--steps", "--time-budget", "--out", "--resume", "--eval-data", "--strategy"],
    "condense": ["--source", "--ipc", "--method", "--init", "--soft-labels", "--resume", "--evaluate", "--out"],
    "evaluate-set": ["--arch", "--models", "--epochs", "--test", "--record"],
    "audit": ["--real", "--teacher", "--quantile", "--strict"],
    "export student": ["--out", "--test", "--int8", "--onnx", "--no-onnx", "--overwrite"],
    "compress": ["--teacher", "--sparsity", "--target-macs", "--importance", "--time-budget", "--int8", "--onnx", "--resume",
                 "--eval-data", "--out"],
    "serve": ["--host", "--port", "--store", "--workers", "--max-upload-mb"],
}


def _leaf_parsers(parser, prefix=()):
    """(command words, parser) of every runnable command of the parser tree."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(prefix), parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*prefix, name))


def test_help_lists_the_commands(processes):
    """datafree --help exits 0 and names every top-level command; the parser has exactly the commands listed here."""
    from datafree.cli import build_parser

    out = processes.result("--help")
    assert out.returncode == 0
    for command in {c.split()[0] for c in COMMANDS}:
        assert command in out.stdout, command
    assert sorted(name for name, _ in _leaf_parsers(build_parser())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_exits_0_and_shows_its_options(command, capsys):
    """`datafree COMMAND --help` exits 0 and shows every option of that command (and the ones listed above)."""
    from datafree.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        main([*command.split(), "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: datafree {command}")
    parser = dict(_leaf_parsers(build_parser()))[command]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for option in {*options, *COMMANDS[command]}:
        assert option in text, option


def test_three_shipped_teachers_with_cards():
    assert {p.stem for p in SHIPPED} >= {"mnist_lenet5", "mnist_lenet5_nobn", "fmnist_convnet"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_inspect_each_shipped_teacher(path, capsys):
    assert main(["teacher", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    card = json.loads(path.with_suffix(".json").read_text())
    assert info["arch"] == card["arch"] and info["num_classes"] == 10
    assert info["test_accuracy"] == card["test_accuracy"]
    assert (len(info["bn_layers"]) == 0) == ("nobn" in path.stem)


def test_export_then_inspect_pt2(tmp_path, capsys):
    teacher = TEACHERS / "mnist_lenet5.safetensors"
    assert main(["teacher", "export", str(teacher), "--to", str(tmp_path / "m.pt2")]) == 0
    assert main(["teacher", "inspect", str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    assert "pt2" in out and "BN layers     4" in out and "1x28x28" in out
    # refuses to overwrite what the user has
    assert main(["teacher", "export", str(teacher), "--to", str(tmp_path / "m.pt2")]) == 2
    assert "exists" in capsys.readouterr().err


def test_exported_program_needs_no_datafree_import(tmp_path):
    assert main(["teacher", "export", str(TEACHERS / "mnist_lenet5.safetensors"), "--to", str(tmp_path / "m.pt2")]) == 0
    code = ("import sys, torch; sys.modules['datafree'] = None; "
            f"m = torch.export.load({str(tmp_path / 'm.pt2')!r}).module(); "
            "print(m(torch.rand(3, 1, 28, 28)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "torch.Size([3, 10])" in out.stdout


@pytest.mark.real_data
def test_shipped_teacher_exported_program_matches_its_accuracy(tmp_path):
    from datafree.data.datasets import load_dataset

    path = TEACHERS / "mnist_lenet5.safetensors"
    assert main(["teacher", "export", str(path), "--to", str(tmp_path / "m.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    test = load_dataset("mnist", train=False)
    with torch.no_grad():
        pred = torch.cat([program(test.spec.denormalize(x)) for x in test.images.split(2000)]).argmax(1)
    acc = (pred == test.labels).float().mean().item() * 100
    assert abs(acc - json.loads(path.with_suffix(".json").read_text())["test_accuracy"]) < 0.02


USER_ERRORS = [
    (["teacher", "inspect", "missing.safetensors"], "no teacher file"),
    (["teacher", "inspect", "pyproject.toml"], "not a model file"),
    (["teacher", "inspect", str(TEACHERS / "mnist_lenet5.safetensors"), "--arch", "nonet"], "unknown architecture"),
    (["teacher", "inspect", str(TEACHERS / "mnist_lenet5.safetensors"), "--dataset", "svhn9"], "unknown data set"),
    (["teacher", "train", "--dataset", "nope", "--out", "x"], "unknown data set"),
    pytest.param(["teacher", "train", "--arch", "nonet", "--out", "x", "--epochs", "0"], "unknown architecture",
                 marks=pytest.mark.real_data),  # the data set is loaded first
]


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """``datafree --help``, each user error below and a pickle teacher: each in its own process, started ahead."""
    pickled = tmp_path_factory.mktemp("pickle") / "t.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    cases = [case.values[0] if hasattr(case, "values") else case[0] for case in USER_ERRORS]
    started = StartedAhead([["--help"], *cases, ["teacher", "inspect", pickled]])
    started.pickled = pickled
    yield started
    started.stop()


@pytest.mark.parametrize("args,message", USER_ERRORS)
def test_user_errors_are_one_sentence_and_exit_2(args, message, processes):
    out = processes.result(*args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_pickle_teacher_refused_from_the_command_line(processes):
    out = processes.result("teacher", "inspect", processes.pickled)  # a torch.save file
    assert out.returncode == 2 and "never unpickles" in out.stderr and "Traceback" not in out.stderr
