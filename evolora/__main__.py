"""`python -m evolora ...` (and `accelerate launch -m evolora run CONFIG`), and the `evolora` command: the
command-line interface. Both enter here rather than in `evolora.cli`, so that a Ctrl-C in the first seconds,
while the CLI imports torch and transformers, ends with one line as a Ctrl-C later does, not a traceback."""

import sys


def main() -> None:
    try:
        from evolora.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted (nothing had started)\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
