"""`python -m autoscaler` is the same as the `autoscaler` command, whose console entry is
main() here.

SIGHUP (reload), SIGUSR2 (rolling restart) and SIGTERM end a process that has no handler
for them, and SIGINT raises KeyboardInterrupt out of whatever is being imported. cli.main
holds them back first thing (its comment says until when), but the console entry was
cli.main, so importing autoscaler.cli (argparse, typing, pathlib: some 15 ms, a third of
the start-up) came before that: a stop or a reload sent then killed `autoscaler run` (exit
143, or a traceback for Ctrl-C). This module imports nothing of ours but the package
(autoscaler/__init__.py: the signals' set) before it holds them; what is left is the
interpreter's own start (some 30 ms), before any code of ours runs, which only a parent
can cover by starting it with them blocked (as the supervisor of ``run --workers`` does).
"""

import signal

from autoscaler import HELD_SIGNALS


def main() -> int:
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    from autoscaler.cli import main as cli_main

    return cli_main(mask=mask)


if __name__ == "__main__":
    raise SystemExit(main())
