"""Every command in the README and the pages of docs/ runs as written: each fenced shell block is read line by
line, and every `make` target it names exists in the Makefile (with the variables it sets used there or being URM_
options), every `urm` command line parses with the real CLI (subcommand, options and their values), and
every `python -m bench NAME` names a benchmark."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cli import app

try:  # recent typer parses with its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
SEPARATORS = {"&&", "||", ";", "|"}


def shell_commands(markdown: str) -> list[list[str]]:
    """The simple commands of every fenced shell block: continuations joined, comments dropped, split at
    && || ; |, leading VAR=value assignments and a `$ ` prompt removed."""
    commands = []
    for block in SHELL_BLOCK.findall(markdown):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split((pending + line).removeprefix("$ "), comments=True)
            except ValueError:  # a quoted argument (JSON, say) goes on over the next line
                pending += line + "\n"
                continue
            pending = ""
            current: list[str] = []
            for token in tokens + [";"]:
                if token in SEPARATORS:
                    while current and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", current[0]):
                        current.pop(0)
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(token.rstrip(";"))
    return commands


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def make_variables() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:]?=", text, re.M)) | set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text))


def urm_envvars() -> set[str]:
    """Every URM_ variable an option of some command reads."""
    names, stack = set(), [typer.main.get_command(app)]
    while stack:
        command = stack.pop()
        stack += list(getattr(command, "commands", {}).values())
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return names


def urm_argv(command: list[str]) -> list[str] | None:
    """The arguments after `urm` (or `.venv/bin/urm`, `python cli.py`, `python -m cli`), else None."""
    for i, token in enumerate(command):
        if token == "urm" or token.endswith("/urm") or token == "cli.py":
            return command[i + 1:]
        if token == "cli" and i and command[i - 1] == "-m":
            return command[i + 1:]
    return None


def check_urm(argv: list[str]) -> None:
    """Parse ``argv`` as the CLI would, down to the subcommand's options; click raises on anything unknown."""
    command = typer.main.get_command(app)
    ctx = command.make_context("urm", list(argv), resilient_parsing=False)
    while hasattr(command, "resolve_command"):  # a group: urm, urm cache
        args = getattr(ctx, "_protected_args", []) + ctx.args  # a group keeps the subcommand's name aside
        if not args:
            return
        name, command, rest = command.resolve_command(ctx, args)
        ctx = command.make_context(name, rest, parent=ctx, resilient_parsing=False)


COMMANDS = shell_commands(README.read_text())
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# (page, command) of every shell block of every page: the README's first, then docs/*.md
PAGE_COMMANDS = [(str(page.relative_to(ROOT)), c) for page in PAGES for c in shell_commands(page.read_text())]


def commands_where(keep) -> list:
    """pytest params of the (page, command) pairs whose command ``keep`` selects, with readable ids."""
    return [pytest.param(page, c, id=f"{page}: {' '.join(c)}") for page, c in PAGE_COMMANDS if keep(c)]


def test_the_readme_has_shell_commands_to_check():
    kinds = {c[0] for c in COMMANDS}
    assert "make" in kinds and any(urm_argv(c) for c in COMMANDS), kinds
    firsts = [c for c in COMMANDS if c[0] == "make"][:2]
    assert firsts == [["make", "demo"], ["make", "test"]], firsts  # the quick start comes first


def test_the_docs_pages_are_checked_too():
    pages = {page for page, _ in PAGE_COMMANDS}
    assert "README.md" in pages and any(page.startswith("docs/") for page in pages), pages
    for page in PAGES:  # every page with a shell block has its commands checked
        if SHELL_BLOCK.search(page.read_text()):
            assert str(page.relative_to(ROOT)) in pages, page


FENCE_OPENING = re.compile(r"^```(.*?)\n.*?^```", re.S | re.M)
NOT_SHELL = {"text", "python", "json", "toml", "yaml"}


def fence_languages(markdown: str) -> list[str]:
    return [lang.strip() for lang in FENCE_OPENING.findall(markdown)]


def test_no_shell_block_escapes_the_check():
    """A fenced block is either a shell block (read above) or names a language that is not a shell: an untagged
    block, or one tagged `shell-session`, would hide its commands from these tests."""
    assert fence_languages("```bash\nmake demo\n```\n```\nurm nope\n```\n") == ["bash", ""]
    for page in PAGES:
        for lang in fence_languages(page.read_text()):
            shell = SHELL_BLOCK.match(f"```{lang}\n```")
            assert shell or lang in NOT_SHELL, f"{page.relative_to(ROOT)}: a ```{lang} block: tag it bash or text"


@pytest.mark.parametrize("page, command", commands_where(lambda c: c[0] == "make"))
def test_make_targets_and_variables_exist(page, command):
    targets, variables, envvars = make_targets(), make_variables(), urm_envvars()
    for arg in command[1:]:
        if arg.startswith("-"):
            continue
        if "=" in arg:
            name = arg.split("=", 1)[0]
            assert name in variables or name in envvars, f"{page}: {name} is neither a Makefile variable nor a URM_ option"
        else:
            assert arg in targets, f"{page}: `make {arg}`: no such target in the Makefile"


@pytest.mark.parametrize("page, command", commands_where(lambda c: urm_argv(c) is not None))
def test_urm_command_lines_parse(page, command):
    try:
        check_urm(urm_argv(command))
    except click_errors.Exit:
        pass  # --help
    except click_errors.ClickException as e:
        pytest.fail(f"{page}: `{' '.join(command)}`: {e.format_message()}")


BENCH_PYTHONS = ("python", ".venv/bin/python", ".venv-vllm/bin/python")


@pytest.mark.parametrize("page, command", commands_where(lambda c: c[0] in BENCH_PYTHONS and c[1:3] == ["-m", "bench"]))
def test_benchmarks_named_exist(page, command):
    names = [a for a in command[3:] if not a.startswith("-")][:1]
    for name in names:
        assert (ROOT / "bench" / f"{name}.py").is_file(), f"{page}: no benchmark bench/{name}.py"


def test_a_wrong_command_is_caught():
    with pytest.raises(click_errors.ClickException):
        check_urm(["extract", "--no-such-option", "1"])
    with pytest.raises(click_errors.ClickException):
        check_urm(["no-such-command"])
    with pytest.raises(click_errors.ClickException):
        check_urm(["extract", "--max-length", "many"])
    assert "no-such-target" not in make_targets() and "demo" in make_targets()
