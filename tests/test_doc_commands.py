"""The commands the docs quote still parse.

Every command in README.md and docs/*.md that runs a script in benchmarks/ or the
``autoscaler`` command (in a code block or in inline code) is parsed with that script's
``build_parser()`` or the CLI's, without running anything: a renamed or removed flag
fails here instead of in a reader's shell. So are the flags a command's comment lists as
its defaults (``cmd  # --rounds 3 --duration 5``), against the parser's defaults, and a
flag quoted on its own (``--no-nginx``), against the commands of its section (any
program's, when the section quotes none).

Run ``python tests/test_doc_commands.py`` to list what is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
DOCS = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
# Flags quoted on their own that belong to other tools.
OTHER_TOOLS = {
    "--lease-timeout": "flyctl",
    "--native": "py-spy",
    "--soak": "pytest (tests/conftest.py)",
}

_FENCE = re.compile(r"^\s*(```|~~~)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PYTHON = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")
_SCRIPT = re.compile(r"^(\./)?(benchmarks/)?([A-Za-z0-9_]+\.py)$")
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_COMMENT = re.compile(r"(?:^|\s)#(.*)$")
_OPERATORS = set("();<>|&")
_ELLIPSES = ("…", "...")
_KEYWORDS = {"do", "then", "else", "time", "exec", "!"}
# Wrappers that run the command after their own options: how many tokens those take.
_WRAPPERS = {"taskset": {"-c": 1}, "nice": {"-n": 1}, "timeout": {}, "env": {}}


@dataclass(frozen=True)
class Command:
    where: str  # doc:line
    program: str  # "autoscaler" or a script's path, "benchmarks/NAME.py"
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join((self.program, *self.args))}"

    @property
    def prefix(self) -> tuple[str, tuple[str, ...]]:
        """The program, with its subcommand for the CLI."""
        return self.program, self.args[:1] if self.program == "autoscaler" else ()


@dataclass(frozen=True)
class Defaults:
    """A comment after a command that lists flags: `--flag VALUE` is that flag's default,
    `[--flag]` an option."""

    where: str
    command: Command
    text: str

    def __str__(self) -> str:
        program, sub = self.command.prefix
        return f"{self.where}: {shlex.join((program, *sub))}  # {self.text}"


@dataclass(frozen=True)
class Mention:
    """Flags quoted without their command: one of its section's commands takes them."""

    where: str
    args: tuple[str, ...]
    section: tuple[Command, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.args)}"


@dataclass(frozen=True)
class Snippet:
    line: int
    text: str
    block: int  # the code block's first line; 0 for inline code
    section: str


def snippets(markdown: str) -> list[Snippet]:
    """Each shell line of a code block (fenced, or indented after a blank line;
    continuations joined; a `$ ` prompt dropped) and each inline code span, with its `##`
    section."""
    found: list[Snippet] = []
    lines = markdown.splitlines()
    section, block = "", 0
    fenced = in_indented = False
    prose: list[tuple[int, str]] = []  # the current paragraph, for its inline code
    pending: tuple[int, str] | None = None  # a code line ending in a backslash

    def end_paragraph() -> None:
        text = "\n".join(line for _, line in prose)
        for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
            first = prose[0][0] + text.count("\n", 0, match.start())
            found.append(Snippet(first, match.group(1).replace("\n", " "), 0, section))
        prose.clear()

    for number, line in enumerate(lines, 1):
        if _FENCE.match(line):
            end_paragraph()
            fenced, block = not fenced, number + 1
            continue
        code = fenced or pending is not None
        if not code and line.startswith("    "):
            code = in_indented or not lines[number - 2].strip()
            if code and not in_indented:
                block = number
        in_indented = code and not fenced and bool(line.strip())
        if not code:
            if line.startswith("## "):
                section = line
            if line.strip():
                prose.append((number, line))
            else:
                end_paragraph()
            continue
        end_paragraph()
        start, line = pending if pending is not None else (number, "")
        line = f"{line} {lines[number - 1].strip().removeprefix('$ ')}".strip()
        if line.endswith("\\"):
            pending = (start, line[:-1])
            continue
        pending = None
        found.append(Snippet(start, line, block, section))
    end_paragraph()
    return found


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unclosed quote: prose in backticks, not a command
        return []


def _optional(token: str) -> str:
    """`[--flag VALUE]` and `[--flag]`, the docs' optional parts, taken as given."""
    if token.startswith("[") and token.endswith("]") and token.count("[") == 1:
        return token[1:-1]
    if token.startswith("[") and token.count("[") > token.count("]"):
        token = token[1:]
    if token.endswith("]") and token.count("]") > token.count("["):
        token = token[:-1]
    return token


def commands_in(text: str, where: str) -> list[Command]:
    """The benchmark and autoscaler commands of one shell line: each command of a list or
    pipeline, after its variable assignments and wrappers (taskset, nice), up to its
    redirections; a for loop's variable stands for its first value. `autoscaler` alone
    is the program's name, not a command; a script is found with or without its
    directory (`sim_bounds.py --excess`)."""
    segments: list[list[str]] = [[]]
    for token in _tokens(text):
        if token and set(token) <= _OPERATORS:  # not an empty argument ('')
            if token[0] in "<>" and segments[-1] and segments[-1][-1].isdigit():
                segments[-1].pop()  # 2>/dev/null: the 2 is no argument
            segments.append([])
        else:
            segments[-1].append(token)
    found: list[Command] = []
    loop: dict[str, str] = {}
    for words in segments:
        while words and words[0] in _KEYWORDS:
            words = words[1:]
        if len(words) >= 3 and words[0] == "for" and words[2] == "in":
            loop[words[1]] = words[3] if len(words) > 3 else ""
            continue
        while words and _ASSIGNMENT.match(words[0]):
            words = words[1:]
        while words and words[0] in _WRAPPERS:
            takes, words = _WRAPPERS[words[0]], words[1:]
            while words and words[0] in takes:
                words = words[1 + takes[words[0]] :]
            while words and (words[0].startswith("-") or _ASSIGNMENT.match(words[0])):
                words = words[1:]
            if words and words[0].replace(".", "").isdigit():  # timeout's duration
                words = words[1:]
        words = [_VARIABLE.sub(lambda m: loop.get(m[1], m[0]), _optional(w)) for w in words]
        if words and _PYTHON.match(words[0]):
            module = words[1:3] == ["-m", "autoscaler"]
            words = ["autoscaler", *words[3:]] if module else words[1:]
        if not words:
            continue
        script = _SCRIPT.match(words[0])
        if words[0] in ("autoscaler", ".venv/bin/autoscaler") and words[1:]:
            found.append(Command(where, "autoscaler", tuple(words[1:])))
        elif script and (script[2] or (BENCHMARKS / script[3]).is_file()):
            found.append(Command(where, f"benchmarks/{script[3]}", tuple(words[1:])))
    return found


def named(args: tuple[str, ...]) -> tuple[str, ...]:
    """Inline code names a flag without its value (`--apps`, `sim_bounds.py --excess`): an
    `…` after it stands for the value, if the flag takes one."""
    out: list[str] = []
    for i, word in enumerate(args):
        out.append(word)
        if word.startswith("--") and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("…")
    return tuple(out)


def doc_checks(doc: str) -> tuple[list[Command], list[Defaults], list[Mention]]:
    commands: list[Command] = []
    sections: dict[str, list[Command]] = {}
    defaults: list[Defaults] = []
    flags: list[tuple[Snippet, tuple[str, ...]]] = []
    last: dict[int, Command] = {}  # a code block's latest command
    for snippet in snippets((REPO / doc).read_text()):
        where = f"{doc}:{snippet.line}"
        found = commands_in(snippet.text, where)
        if not snippet.block:
            found = [Command(c.where, c.program, named(c.args)) for c in found]
        commands += found
        sections.setdefault(snippet.section, []).extend(found)
        if snippet.block and found:
            last[snippet.block] = found[-1]
        comment = _COMMENT.search(snippet.text) if snippet.block else None
        if comment and snippet.block in last:
            text = comment[1].strip().removeprefix("defaults:").strip()
            if text.startswith(("--", "[--")):
                defaults.append(Defaults(where, last[snippet.block], text))
        if not snippet.block and snippet.text.startswith("--"):
            first = snippet.text.replace("\\|", "|").split("|")[0]  # `--profile fast\|fly`
            args = named(tuple(_optional(w) for w in first.split()))
            if args[0] not in OTHER_TOOLS:
                flags.append((snippet, args))
    mentions = [
        Mention(f"{doc}:{snippet.line}", args, tuple(sections.get(snippet.section, ())))
        for snippet, args in flags
    ]
    return commands, defaults, mentions


@functools.cache
def parser_of(program: str) -> argparse.ArgumentParser:
    """The CLI's parser, or a benchmark script's (loaded by path, as a script runs: its
    directory on sys.path for its sibling imports, put back afterwards)."""
    if program == "autoscaler":
        from autoscaler.cli import build_parser

        return build_parser()
    path = REPO / program
    assert path.is_file(), f"{program}: no such script"
    saved_path, saved_modules = sys.path[:], set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        assert hasattr(module, "build_parser"), f"{program} has no build_parser()"
        parser: argparse.ArgumentParser = module.build_parser()
        return parser
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if str(getattr(sys.modules[name], "__file__", "")).startswith(str(BENCHMARKS)):
                del sys.modules[name]


def _options(program: str, sub: Sequence[str]) -> dict[str, argparse.Action]:
    parser = parser_of(program)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and sub and sub[0] in action.choices:
            parser = action.choices[sub[0]]
    return parser._option_string_actions


def every_program() -> set[tuple[str, tuple[str, ...]]]:
    """The CLI's commands and the benchmark scripts: whose flags a section that quotes no
    command may name (docs/emulator.md's table of `autoscaler emulator` flags)."""
    sub = next(
        a for a in parser_of("autoscaler")._actions if isinstance(a, argparse._SubParsersAction)
    )
    return {("autoscaler", (name,)) for name in sub.choices} | {
        (f"benchmarks/{path.name}", ()) for path in BENCHMARKS.glob("*.py")
    }


def _placeholder(token: str) -> bool:
    return token in _ELLIPSES or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", token))


def without_placeholders(program: str, args: Sequence[str]) -> list[str]:
    """The args without the docs' placeholders (`--jobs N`, `--config …`, `--logs DIR`): one
    that stands for an option's value goes with its option, once the parser says that
    option takes a value; a lone `…` (more of the same) goes alone."""
    options = _options(program, args[:1])
    kept: list[str] = []
    for token in args:
        if _placeholder(token) and kept:
            action = options.get(kept[-1])
            if action is not None and action.nargs != 0:
                kept.pop()
                continue
        if token not in _ELLIPSES:
            kept.append(token)
    return kept


def parse(program: str, args: Sequence[str]) -> argparse.Namespace | str:
    """The namespace the program's parser makes of the args, or what it says against them
    (and against a flag it takes only as an abbreviation of a longer one)."""
    options = _options(program, args[:1])
    for word in args:
        if word.startswith("--") and word.split("=")[0] not in options:
            return f"{word}: not an option (argparse may take it for a longer one)"
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            return parser_of(program).parse_args(without_placeholders(program, args))
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return argparse.Namespace()
        return stderr.getvalue().strip().splitlines()[-1]


def default_errors(claim: Defaults) -> list[str]:
    """What is wrong with the comment's flags: unknown, not parsing, or a value that is
    not the default (but for an `[--optional VALUE]`)."""
    program, sub = claim.command.prefix
    options = _options(program, sub)
    defaults = parse(program, sub)
    assert isinstance(defaults, argparse.Namespace), defaults
    errors: list[str] = []
    words = [w.rstrip(";,") for w in claim.text.split()]
    while words and words[0].lstrip("[").startswith("--"):
        optional = words[0].startswith("[")
        flag = _optional(words.pop(0))
        action = options.get(flag)
        if action is None:
            errors.append(f"{flag}: no such option")
            break
        value = [_optional(words.pop(0))] if action.nargs != 0 and words else []
        parsed = parse(program, [*sub, flag, *value])
        if isinstance(parsed, str):
            errors.append(parsed)
        elif (
            value
            and not optional
            and getattr(parsed, action.dest) != getattr(defaults, action.dest)
        ):
            errors.append(f"{flag} defaults to {getattr(defaults, action.dest)!r}, not {value[0]}")
    return errors


CHECKS = [doc_checks(doc) for doc in DOCS]
COMMANDS = [c for commands, _, _ in CHECKS for c in commands]
DEFAULTS = [d for _, defaults, _ in CHECKS for d in defaults]
MENTIONS = [m for _, _, mentions in CHECKS for m in mentions]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_the_docs_command_parses(command: Command) -> None:
    error = parse(command.program, command.args)
    assert not isinstance(error, str), f"{command}\n  {error}"


@pytest.mark.parametrize("claim", DEFAULTS, ids=[d.where for d in DEFAULTS])
def test_the_flags_a_commands_comment_lists_are_its_defaults(claim: Defaults) -> None:
    assert default_errors(claim) == [], str(claim)


@pytest.mark.parametrize("mention", MENTIONS, ids=[m.where for m in MENTIONS])
def test_a_flag_quoted_alone_is_one_of_its_sections_commands(mention: Mention) -> None:
    prefixes = {c.prefix for c in mention.section} or every_program()
    parsed = [parse(program, [*sub, *mention.args]) for program, sub in prefixes]
    assert any(isinstance(p, argparse.Namespace) for p in parsed), (
        f"{mention}: none of {sorted(prefixes)} takes it: {parsed}"
    )


@pytest.mark.parametrize("doc", DOCS)
def test_every_benchmark_the_doc_names_is_among_its_commands(doc: str) -> None:
    """A script named where the extraction sees no command (prose outside backticks, a
    form of command it does not know) would go unchecked."""
    named = set(re.findall(r"benchmarks/[A-Za-z0-9_]+\.py", (REPO / doc).read_text()))
    found = {c.program for c in doc_checks(doc)[0]}
    assert named - {"benchmarks/loop_stalls/sitecustomize.py"} <= found


def test_the_extraction_reads_shell_as_the_docs_write_it() -> None:
    markdown = "\n".join(
        [
            "Run `benchmarks/sim_goals.py --shapes",
            "sessions --hours 168` or `autoscaler simulate`'s baselines.",
            "",
            "```sh",
            "CI=true PYTHONPATH=benchmarks/x \\",
            "    .venv/bin/python benchmarks/cluster.py --ttl 2 [--kills 3]  # comment",
            "autoscaler status --watch | head -3; autoscaler run --config … 2>/dev/null &",
            "for s in 41 42; do taskset -c 1 python3 benchmarks/sim_bounds.py --seed $s; done",
            "$ python -m autoscaler demo > out.txt && curl -s http://127.0.0.1:8080/",
            "```",
            "",
            "    .venv/bin/autoscaler check-config config/x.yaml",
            "",
            "`sim_regular.py --costs 1500`, `setup.py --help`, `autoscaler`.",
        ]
    )
    found = [
        (c.where, c.program, c.args)
        for snippet in snippets(markdown)
        for c in commands_in(snippet.text, str(snippet.line))
    ]
    assert found == [
        ("1", "benchmarks/sim_goals.py", ("--shapes", "sessions", "--hours", "168")),
        ("2", "autoscaler", ("simulate",)),
        ("5", "benchmarks/cluster.py", ("--ttl", "2", "--kills", "3")),
        ("7", "autoscaler", ("status", "--watch")),
        ("7", "autoscaler", ("run", "--config", "…")),
        ("8", "benchmarks/sim_bounds.py", ("--seed", "41")),
        ("9", "autoscaler", ("demo",)),
        ("12", "autoscaler", ("check-config", "config/x.yaml")),
        ("14", "benchmarks/sim_regular.py", ("--costs", "1500")),
    ]


if __name__ == "__main__":
    for command in COMMANDS:
        print(command)
    for claim in DEFAULTS:
        print(claim)
    for mention in MENTIONS:
        print(mention)
