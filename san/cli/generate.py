"""The man page (docs/san.1) and the bash completion (docs/san.bash-completion), generated from the CLI's parser
with argparse-manpage and shtab, so they cannot drift from it: `make docs` writes them, a test checks them.

Both libraries are needed only here (they are in the test extras), never when san runs."""

from __future__ import annotations

import os
import sys

from san.cli.parser import build_parser

DATE = "December 2026"  # fixed, so that regenerating gives the same file; changed with the release


def manpage() -> str:
    from argparse_manpage.manpage import Manpage

    page = str(Manpage(build_parser()))
    first, rest = page.split("\n", 1)
    assert first.startswith(".TH "), first
    return f'.TH SAN "1" "{DATE}" "san {_version()}" "san manual"\n{rest}'


def bash_completion() -> str:
    import shtab

    return str(shtab.complete(build_parser(), "bash"))


def _version() -> str:
    import san

    return san.__version__


def main(argv: list[str]) -> int:
    directory = argv[0] if argv else "docs"
    for name, text in (("san.1", manpage()), ("san.bash-completion", bash_completion())):
        with open(os.path.join(directory, name), "w") as out:
            out.write(text)
        print(f"wrote {os.path.join(directory, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
