"""The README and docs/ as a user reads them: the quick start's commands are ones the CLI accepts,
the docs name runs by date and card (no working-session numbers, no tool-call syntax), and every
results folder they link to exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md")])


def _section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _bash_lines(text: str) -> list[str]:
    """The lines of the ```bash blocks of ``text``, comments dropped, continuations joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def _fasterrcnn_commands(text: str) -> list[list[str]]:
    """Every ``fasterrcnn ...`` command of the bash blocks: its arguments, up to ``&``, ``&&``, ``|``
    or a redirection."""
    commands = []
    for words in _bash_lines(text):
        for i, word in enumerate(words):
            if Path(word).name == "fasterrcnn":
                argv = []
                for w in words[i + 1:]:
                    if w in ("&", "&&", "|", "||", ";") or w.endswith(";") or w.startswith((">", "<", "2>")):
                        break
                    argv.append(w.rstrip("&"))
                commands.append(argv)
    return commands


def _check_accepted(argv: list[str]) -> None:
    """Parse ``argv`` with the real parsers (SystemExit on a bad flag) and, for export and serve,
    build the options (OptionsError on a bad combination)."""
    from fasterrcnn.__main__ import build_parser
    from fasterrcnn.options import Options

    if argv[0] == "detect":
        from client.detect import build_parser as detect_parser

        detect_parser().parse_args(argv[1:])
        return
    if argv[0] == "evaluate":
        from client.evaluate import build_parser as evaluate_parser

        evaluate_parser().parse_args(argv[1:])
        return
    args = build_parser().parse_args(argv)
    Options.from_args(args)


def test_quick_start_is_install_export_serve_detect():
    commands = _fasterrcnn_commands(_section(README.read_text(), "Quick start"))
    subcommands = [argv[0] for argv in commands]
    assert subcommands[:3] == ["export", "serve", "detect"], subcommands
    assert "--device" in sum(commands, []), "the quick start has no GPU line"


def test_quick_start_commands_are_accepted_by_the_cli():
    commands = _fasterrcnn_commands(_section(README.read_text(), "Quick start"))
    assert len(commands) >= 5, commands
    for argv in commands:
        try:
            _check_accepted(argv)
        except SystemExit as e:  # argparse's usage error
            pytest.fail(f"the README's quick start has `fasterrcnn {shlex.join(argv)}`, which the CLI refuses ({e})")


def test_every_readme_command_is_accepted_by_the_cli():
    commands = _fasterrcnn_commands(README.read_text())
    assert len(commands) >= 10, commands
    for argv in commands:
        try:
            _check_accepted(argv)
        except SystemExit as e:
            pytest.fail(f"the README has `fasterrcnn {shlex.join(argv)}`, which the CLI refuses ({e})")


def test_quick_start_installs_an_extra_that_exists():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [w for words in _bash_lines(_section(README.read_text(), "Quick start")) for w in words
                if w.startswith(".[")]
    assert installs, "the quick start installs nothing"
    for spec in installs:
        for extra in spec[2:-1].split(","):
            assert extra in extras, f"the quick start installs .[{extra}], which pyproject.toml does not define"


def test_a_fresh_machine_has_two_set_up_commands():
    lines = _bash_lines(_section(README.read_text(), "Set up and run (a fresh machine: Python 3.10+, `make`)"))
    assert lines == [["make", "demo"], ["make", "test"]], lines


SESSION = re.compile(r"\bsessions?\s+\d+", re.I)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_runs_by_date_not_by_session(path):
    text = path.read_text()
    found = [ln for ln in text.splitlines() if SESSION.search(ln)]
    assert not found, f"{path.relative_to(ROOT)} names working sessions: {found[:3]}"
    found = [ln for ln in text.splitlines() if "carry=" in ln]
    assert not found, f"{path.relative_to(ROOT)} has lines a user cannot type: {found[:3]}"


def test_results_folders_are_named_by_date_and_card():
    names = [p.name for p in (ROOT / "docs" / "results").iterdir()]
    bad = [n for n in names if not re.fullmatch(r"\d{4}-\d{2}-\d{2}-(h100|h200)-[a-z0-9-]+", n)]
    assert not bad, f"docs/results entries not named <date>-<card>-<what>: {bad}"


@pytest.mark.parametrize("path", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_to_results_exist(path):
    text = path.read_text()
    base = ROOT if path == README else path.parent
    prefix = "docs/results/" if path == README else "results/"
    targets = re.findall(re.escape(prefix) + r"[^\s)`'\"\]:;,]*", text)
    missing = sorted({t for t in targets if not (base / t.rstrip(".")).exists()})
    assert not missing, f"{path.name} links to results that do not exist: {missing}"
