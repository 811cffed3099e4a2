"""The README and docs/ show commands users copy: keep every one of them honest.

The README's two set-up commands are the ones CI and users run. Beyond those, every
``pyactadd`` command line in a ``sh`` block of the README or docs/*.md is parsed by the real
CLI's own option parser (no model loads), every option in docs/commands.md's tables exists
in the CLI and every CLI option is in those tables, every repository path and link the
pages name exists, and every Python block compiles and imports what exists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pyactadd.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("pyactadd", "cpp", "scripts", "tests", "benchmarks", "docs", "convert")
OPERATORS = {"&&", "||", "|", ";", "(", ")", "&", ">", "<", ">>"}


def readme_command(heading: str) -> str:
    after = (ROOT / "README.md").read_text().split(heading, 1)[1]
    return re.search(r"```sh\n(.*?)\n```", after, re.S).group(1).strip()


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", page.read_text(), re.S)


def shell_words(line: str) -> list[str]:
    """``line`` split as bash would, comments dropped, operators (``&&``, ``|``, ``$(``) apart."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def shell_lines(block: str) -> list[list[str]]:
    """The block's command lines as words; a quoted string may run over several lines."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending += ("\n" if pending else "") + line
        try:
            lines.append(shell_words(pending))
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = ""
    assert not pending, f"unclosed quote in: {pending}"
    return lines


def pyactadd_invocations(page: Path) -> list[list[str]]:
    """Every ``pyactadd COMMAND ARGS…`` in the page's sh blocks, as argument lists."""
    found = []
    for block in code_blocks(page, "sh"):
        for words in shell_lines(block):
            for i, word in enumerate(words):
                if word == "pyactadd" and (i == 0 or words[i - 1] in OPERATORS | {"$"}):
                    args = []
                    for arg in words[i + 1:]:
                        if arg in OPERATORS:
                            break
                        args.append(arg)
                    found.append(args)
    return found


def all_invocations() -> list[tuple[str, list[str]]]:
    return [(page.name, args) for page in PAGES for args in pyactadd_invocations(page)]


def option_names(command: click.Command) -> set[str]:
    names = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


def long_options(command: click.Command) -> set[str]:
    """The options a user is offered (hidden ones are the CLI's own business)."""
    shown = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    return {name for p in shown for name in (*p.opts, *p.secondary_opts) if name.startswith("--") and name != "--help"}


# --- the two set-up commands ----------------------------------------------------------------


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "Set up and run the tests:" in ci
    command = readme_command("Set up and run the tests:")
    assert "torch==2.13.0" in command and "pytest" in command


def test_main_command_runs_extract_and_compare_on_the_default_model():
    command = readme_command("steered completions side by side:")
    assert "torch==2.13.0" in command
    assert "pyactadd extract" in command and "pyactadd run" in command and "--compare" in command
    assert "--model" not in command


def test_readme_is_short_and_says_the_sample_is_one_machines():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "on another CPU the same seed gives other words" in text


# --- every pyactadd command line shown -------------------------------------------------------


def test_the_pages_show_commands_at_all():
    shown = all_invocations()
    assert len(shown) > 30
    assert {args[0] for _, args in shown} >= set(cli.commands)


def test_the_readme_shows_one_example_of_every_command():
    shown = {args[0] for args in pyactadd_invocations(ROOT / "README.md")}
    assert shown >= set(cli.commands), f"no README example of: {sorted(set(cli.commands) - shown)}"


@pytest.mark.parametrize("page, args", all_invocations(), ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_every_shown_command_parses(page, args):
    """The CLI's own parser takes the line: the command, its options and arguments exist."""
    assert args and args[0] in cli.commands, f"{page}: no command 'pyactadd {args[0] if args else ''}'"
    command = cli.commands[args[0]]
    ctx = click.Context(command, info_name=args[0])
    try:
        values, leftover, _ = command.make_parser(ctx).parse_args(args=list(args[1:]))
    except click.UsageError as exc:
        pytest.fail(f"{page}: pyactadd {' '.join(args)}: {exc.format_message()}")
    assert not leftover, f"{page}: pyactadd {' '.join(args)}: extra arguments {leftover}"
    for param in command.params:
        if param.required and values.get(param.name) in (None, ()):
            pytest.fail(f"{page}: pyactadd {' '.join(args)}: {param.name} is required")


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "Examples:" in result.output


# --- docs/commands.md's option tables --------------------------------------------------------


def command_sections() -> list[tuple[set[str], str]]:
    """docs/commands.md as (commands its heading names, section text) per ``##`` section."""
    sections = []
    for section in re.split(r"^## ", (ROOT / "docs" / "commands.md").read_text(), flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        named = set(re.findall(r"pyactadd (\w+)", heading)) | set(re.findall(r"`(\w+)`", heading))
        sections.append((named & set(cli.commands), body))
    return sections


def table_options(body: str) -> set[str]:
    """Option names in the first column of the section's tables."""
    names = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ", 1)[0]
            names.update(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", first))
    return names


def test_every_option_in_the_tables_exists():
    for commands, body in command_sections():
        assert commands, "a docs/commands.md section names no command in its heading"
        known = set().union(*(option_names(cli.commands[name]) for name in commands))
        unknown = table_options(body) - known
        assert not unknown, f"docs/commands.md, {sorted(commands)}: no such option {sorted(unknown)}"


def test_every_option_of_every_command_is_in_the_tables():
    documented: dict[str, set[str]] = {name: set() for name in cli.commands}
    for commands, body in command_sections():
        for name in commands:
            documented[name] |= table_options(body)
    for name, command in cli.commands.items():
        missing = long_options(command) - documented[name]
        assert not missing, f"docs/commands.md: pyactadd {name}'s {sorted(missing)} in no table"


# --- paths, links, Python ----------------------------------------------------------------------


def named_paths(text: str) -> set[str]:
    """Repository paths in inline code and in code blocks (``pyactadd/vector/layers.py``)."""
    pattern = rf"(?<![\w./~-])((?:{'|'.join(TOP_DIRS)})/[\w./*-]*)"
    return {m.rstrip(".,:") for m in re.findall(pattern, text) if "*" not in m}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_path_exists(page):
    text = page.read_text()
    missing = sorted(p for p in named_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not missing, f"{page.name}: broken links {missing}"


def python_blocks() -> list[tuple[str, str]]:
    return [(page.name, block) for page in PAGES for block in code_blocks(page, "python")]


def module_defines(module: str, name: str) -> bool:
    """Whether ``module`` has ``name`` at its top level, read from its source (nothing is run)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.origin is None or not spec.origin.endswith(".py"):
        return hasattr(importlib.import_module(module), name)
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
    return False


@pytest.mark.parametrize("page, block", python_blocks(), ids=lambda v: v if v.endswith(".md") else v.splitlines()[0][:40])
def test_every_python_block_compiles_and_names_what_exists(page, block):
    import pyactadd

    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert importlib.util.find_spec(alias.name), f"{page}: no module {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert module_defines(node.module, alias.name), f"{page}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pyactadd":
            assert node.attr in pyactadd.__all__, f"{page}: pyactadd.{node.attr} is not public"


def test_the_moved_modules_table_names_modules_that_exist():
    text = (ROOT / "docs" / "development.md").read_text()
    table = text.split("### Moved modules", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `pyactadd.")]
    assert len(rows) >= 10
    for row in rows:
        new = row.split(" | ")[1]
        for module in re.findall(r"`(pyactadd[\w.]*)`", new):
            assert importlib.util.find_spec(module), f"docs/development.md: {module} does not exist"
