"""The README and the pages of docs/, and what tests read in them: fenced blocks, the commands they show.

Tests find a command or a table by what it says (its first words, the first cell of its rows), never by the heading
above it or the order of the sections, so that the pages can be reorganised freely.
"""

import re
import shlex
from pathlib import Path

from conftest import ROOT

# The pages a user reads: the README, docs/*.md and the results' index. The other files of docs/results/ are records
# of past runs, with the commands those runs used.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs/results/README.md"]


def page(name: str) -> str:
    return (ROOT / name).read_text()


def blocks(text: str, language: str = "bash") -> list[str]:
    """The fenced blocks of `text` in `language` ("" for a plain fence), unindented ones only."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and `&&` chains split off."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            found += [part.strip() for part in line.split("&&")]
    return found


def documented(start: str, *names: str) -> list[str]:
    """The first command that begins with `start` in the bash blocks of the pages `names` (all pages when none), as
    the shell splits it into words."""
    texts = [page(name) for name in names] if names else [path.read_text() for path in PAGES]
    for text in texts:
        for block in blocks(text):
            for line in commands(block):
                if line.startswith(start):
                    return shlex.split(line)
    raise AssertionError(f"no command that starts with {start!r} in {names or 'the pages'}")


def settings(words: list[str]) -> dict[str, str]:
    """The `-S key=value` pairs of a `dvc exp run` command, values as written."""
    pairs = [value for flag, value in zip(words, words[1:], strict=False) if flag in ("-S", "--set-param")]
    return dict(pair.split("=", 1) for pair in pairs)


def exp_show_command() -> list[str]:
    """The docs' `dvc exp show` command for a readable table."""
    return documented("dvc exp show --", "docs/experiments.md")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))
