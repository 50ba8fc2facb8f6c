"""The README cannot drift: its quick start runs as written, every command line it shows parses
with the real parsers (options, choices, values), every Python snippet compiles and its imports
resolve, and every ``make`` target it names exists."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.demo_available import requires_demo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
PROGRAMS = {"dyvte-stats": "analysis.cli", "dyvte-exit": "exit.cli", "-m analysis": "analysis.cli",
            "-m exit.cli": "exit.cli", "-m analysis.demo.training": "analysis.demo.training"}


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def command_lines() -> list[str]:
    """Every command of the README's bash blocks (continuation lines joined, comments dropped)."""
    lines = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def parser_for(line: str):
    """(module of the parser, argv) of a toolkit command line, or None for any other command."""
    words = shlex.split(line)
    for marker, module in PROGRAMS.items():
        marker_words = marker.split()
        for start in range(len(words)):
            if words[start : start + len(marker_words)] == marker_words:
                return module, words[start + len(marker_words):]
    return None


def test_the_readme_shows_commands_of_both_command_lines():
    modules = {found[0] for line in command_lines() if (found := parser_for(line))}
    assert {"analysis.cli", "exit.cli"} <= modules


@pytest.mark.parametrize("line", [line for line in command_lines() if parser_for(line)])
def test_every_readme_command_line_parses(line, monkeypatch):
    import importlib

    module, argv = parser_for(line)
    cli = importlib.import_module(module)
    parser = cli.build_parser() if hasattr(cli, "build_parser") else None
    if parser is None:  # analysis.demo.training builds its parser inside main(): ask it for --help
        pytest.skip(f"{module} has no build_parser")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"README line does not parse (exit {stop.code}): {line}")
    assert callable(getattr(args, "run", None)), line


def test_every_python_snippet_compiles_and_its_imports_resolve():
    snippets = blocks("python")
    assert len(snippets) >= 5
    for number, body in enumerate(snippets):
        tree = ast.parse(body, f"README python block {number}")
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        module = ast.Module(body=imports, type_ignores=[])
        exec(compile(module, f"README python block {number} (imports)", "exec"), {})


def test_every_make_target_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README)) | set(re.findall(r"^make ([a-z][\w-]*)", README, re.M))
    assert named and named <= targets, f"README names make targets {sorted(named - targets)} that the Makefile lacks"


def test_the_first_lines_give_the_two_commands():
    first = README.splitlines()[:4]
    assert first[0] == "```bash" and first[1].startswith("make demo") and first[2].startswith("make test")


@requires_demo
def test_the_quick_start_runs_as_written(tmp_path):
    marker = README.index("<!-- quickstart -->")
    language, body = BLOCK.search(README, marker).groups()
    assert language == "python" and "load_model(" in body
    script = tmp_path / "quickstart.py"
    script.write_text(body, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "relative_prefill_flops" in done.stdout and "mass" in done.stdout


def test_every_option_of_both_command_lines_has_help_text():
    import argparse

    import analysis.cli
    import exit.cli

    missing = []
    for program, parser in (("dyvte-stats", analysis.cli.build_parser()), ("dyvte-exit", exit.cli.build_parser())):
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, sub in commands.choices.items():
            for action in sub._actions:
                if action.option_strings and action.help in (None, "") and not isinstance(action, argparse._HelpAction):
                    missing.append(f"{program} {name} {action.option_strings[0]}")
            assert sub.epilog and "examples:" in sub.epilog, f"{program} {name} --help shows no examples"
    assert not missing, "options without help text: " + ", ".join(missing)


WORLD = {"ckpt", "img", "q.jsonl", "stats", "runs/eval"}
"""What ``readme_world`` makes (the README's placeholders)."""


def demo_outputs() -> set[str]:
    """The folders the README's demo-model command lines write (their --out) that the world lacks."""
    outputs = set()
    for line in command_lines():
        words = shlex.split(line)
        if "--model demo" in line and "--out" in words[:-1]:
            outputs.add(words[words.index("--out") + 1])
    return outputs - WORLD


def runnable(line: str) -> bool:
    """README command lines that run here as written: not under torchrun (tests/test_distributed.py),
    not on a GPU, not on the demo model (its commands are covered by tests/test_demo_model.py), and
    not reading what a demo-model line of the README wrote."""
    found = parser_for(line)
    return bool(found) and found[0] in ("analysis.cli", "exit.cli") and "torchrun" not in line \
        and "--device cuda" not in line and "--model demo" not in line and not set(shlex.split(line)) & demo_outputs()


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory):
    """What the README's placeholders name, made of a tiny model: ./ckpt, q.jsonl + img/, a dump in
    stats/ and an evaluation in runs/eval."""
    from PIL import Image

    from analysis.cli import main
    from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava
    from tests.exit_results_data import write_results_folder

    root = tmp_path_factory.mktemp("readme")
    save_tiny_llava(root / "ckpt", TinyLlavaSpec(image_size=28))
    (root / "img").mkdir()
    lines = []
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(root / "img" / f"{i}.png")
        lines.append(f'{{"question_id": "q{i}", "image": "{i}.png", "text": "What colour?", "answer": "{colour}"}}\n')
    (root / "q.jsonl").write_text("".join(lines))
    assert main(["dump", "--model", str(root / "ckpt"), "--questions", str(root / "q.jsonl"), "--image-folder",
                 str(root / "img"), "--out", str(root / "stats"), "--no-progress", "--quiet"]) == 0
    write_results_folder(root / "runs" / "eval")
    return root


@pytest.mark.parametrize("line", [line for line in command_lines() if runnable(line)])
def test_readme_command_lines_run_as_written(line, readme_world, tmp_path, monkeypatch):
    import importlib
    import shutil

    for name in ("ckpt", "img", "q.jsonl", "runs"):
        (tmp_path / name).symlink_to(readme_world / name)
    words = shlex.split(line)
    reads_a_dump = words[0] == "dyvte-stats" and (words[1] != "dump" or "--resume" in words)
    if reads_a_dump:
        shutil.copytree(readme_world / "stats", tmp_path / "stats")  # a dump for the commands that read one
    monkeypatch.chdir(tmp_path)
    module, argv = parser_for(line)
    assert importlib.import_module(module).main(argv) == 0, line
