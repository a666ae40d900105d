"""Sections of bench/RESULTS.md, written by the scripts that measure them.

A section is a level-3 heading that names a command, then its body: everything up to the next heading.

    ### `python bench/speed.py --device cpu`

    ```
    (what the command printed)
    ```

Text after the command's closing backtick, such as "(what `make demo` runs)", is a note the heading keeps. A script
that takes `--record` prints as usual, then writes what it printed into the section of the command that was run:
the section whose command runs the same script with the same arguments, as the script's own parser reads them (so
`python bench/speed.py` is the section `python bench/speed.py --device cpu` when cpu is the default, and the order of
the options does not matter), or else a new section at the end of the file, headed by the command line as run.
Recording replaces the section's whole body: notes written beside a table belong to the run that printed it.

    python bench/quant_size.py --record                   # into bench/RESULTS.md
    python bench/quant_size.py --record /tmp/RESULTS.md   # into another copy
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamprune.fileio import atomic_write  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
_HEADING = re.compile(r"^(#{1,6}) ")
_COMMAND = re.compile(r"^### `([^`]+)`")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the body of the section headed by the line `heading` replaced by `body` (a section ends at the
    next heading of any level); a missing section is appended at the end."""
    lines = text.splitlines()
    body_lines = [""] + body.strip("\n").splitlines() + [""]
    try:
        start = lines.index(heading)
    except ValueError:
        while lines and not lines[-1].strip():
            lines.pop()
        return "\n".join(lines + ["", heading] + body_lines).rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if _HEADING.match(lines[i])), len(lines))
    return "\n".join(lines[: start + 1] + body_lines + lines[end:]).rstrip("\n") + "\n"


def write_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section headed by the line `heading` in the file at `path`, atomically."""
    path = Path(path)
    text = replace_section(path.read_text(encoding="utf-8"), heading, body)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fenced(printed: str) -> str:
    """What a script printed, as the body of its section."""
    return "```\n" + printed.strip("\n") + "\n```"


def add_record_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", nargs="?", const=RESULTS, default=None, type=Path, metavar="FILE",
                        help=f"after printing, write the output into this command's section of FILE "
                             f"(default {RESULTS.relative_to(ROOT)}; see bench/results.py)")


def _script(argv0: str) -> str:
    path = Path(argv0).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _drop_options(argv: list[str], parser: argparse.ArgumentParser, dests: Iterable[str]) -> list[str]:
    """`argv` without the options (and their values) whose destination is in `dests`."""
    drop = {s: a for a in parser._actions if a.dest in set(dests) for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        action = drop.get(name)
        i += 1
        if action is None:
            out.append(token)
        elif "=" not in token and action.nargs != 0:
            if action.nargs == "?":
                i += i < len(argv) and not argv[i].startswith("-")
            else:
                count = 1 if action.nargs is None else action.nargs
                if isinstance(count, int):
                    i += count
                else:  # "*" or "+": every value up to the next option
                    while i < len(argv) and not argv[i].startswith("-"):
                        i += 1
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            return None


def _same_run(a: argparse.Namespace, b: argparse.Namespace, ignore: set[str]) -> bool:
    return ({k: v for k, v in vars(a).items() if k not in ignore}
            == {k: v for k, v in vars(b).items() if k not in ignore})


def find_heading(text: str, script: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 ignore: set[str]) -> str | None:
    """The heading line of the first section whose command runs `script` with the arguments `args`."""
    for line in text.splitlines():
        match = _COMMAND.match(line)
        if not match:
            continue
        try:
            tokens = shlex.split(match.group(1))
        except ValueError:
            continue
        while tokens and _ENV.match(tokens[0]):
            tokens.pop(0)  # OMP_NUM_THREADS=1 and the like: the environment, not the arguments
        if len(tokens) < 2 or not tokens[0].startswith("python") or tokens[1] != script:
            continue
        theirs = _parse(parser, tokens[2:])
        if theirs is not None and _same_run(theirs, args, ignore):
            return line
    return None


def record(printed: str, parser: argparse.ArgumentParser, path: Path = RESULTS, ignore: Iterable[str] = (),
           argv: list[str] | None = None) -> str:
    """Write `printed` into the section of the command that was run (`argv`, default sys.argv, read by `parser`)
    in the file at `path`; `ignore`: options that say where things go rather than what is measured (never part
    of the match or of a new heading). Returns the section's heading line."""
    argv = list(sys.argv if argv is None else argv)
    ignore = {"record", *ignore}
    script = _script(argv[0])
    path = Path(path)
    args = _parse(parser, argv[1:])
    if args is None:
        raise ValueError(f"{shlex.join(argv)!r} is not a command line of {script}")
    heading = find_heading(path.read_text(encoding="utf-8"), script, parser, args, ignore)
    if heading is None:
        heading = "### `" + shlex.join(["python", script, *_drop_options(argv[1:], parser, ignore)]) + "`"
    write_section(heading, fenced(printed), path)
    return heading


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recording(parser: argparse.ArgumentParser, args: argparse.Namespace,
              ignore: Iterable[str] = ()) -> Iterator[None]:
    """Print as usual inside the block; with `--record`, write what was printed to stdout into this command's
    section once the block ends without an error."""
    if args.record is None:
        yield
        return
    captured = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, captured)):
        yield
    heading = record(captured.getvalue(), parser, args.record, ignore)
    print(f"recorded in {args.record}: {heading}", file=sys.stderr)
