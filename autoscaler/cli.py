"""argv → subcommand. Each subcommand's work lives in its own module; this file only parses.

Every subcommand is registered in ``_COMMANDS`` with a function that adds its arguments and
a function that runs it (imported lazily, so ``autoscaler --help`` stays fast).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO, cast

from autoscaler import HELD_SIGNALS

Runner = Callable[[argparse.Namespace], int]


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe log level shown (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: JSON lines unless stdout is a terminal (default: auto)",
    )


def _given(text: str) -> str:
    """A flag's value that may not be empty: ``--config ''`` (a variable that was unset)
    fell back to $AUTOSCALER_CONFIG or config/autoscaler.yaml without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty one")
    return text


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=_given,
        metavar="PATH",
        help="YAML config file (default: $AUTOSCALER_CONFIG, else config/autoscaler.yaml)",
    )


# --- check-config -----------------------------------------------------------------------


def _check_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        type=_given,
        metavar="PATH",
        help="file to check (as --config: give one of them)",
    )
    _add_config(parser)
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="check it as `run --emulator` starts on it: the embedded emulator plays the"
        " Machines API (overrides fly.api_url)",
    )
    # Its findings are its output: a call that fails is reported once, as a warning line.
    parser.set_defaults(log_level="error")


def _check_config(args: argparse.Namespace) -> int:
    from autoscaler.check import check_config

    if args.path is not None and args.config is not None:
        # One was checked and the other not looked at: the user may think both were.
        print(
            f"autoscaler check-config: give the file once, as PATH or as --config PATH"
            f" (got both: {args.path} and --config {args.config})",
            file=sys.stderr,
        )
        return 2
    path = args.path if args.path is not None else args.config
    return check_config(path, emulator=args.emulator)


# --- status -----------------------------------------------------------------------------


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        metavar="URL",
        help="admin server, as http://host:port (or its /status URL) or host:port (default: "
        "admin.listen)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw /status JSON")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="ask every second until Ctrl-C: a live view on a terminal (machines, request "
        "rate and latency), else the table (or a JSON line) each second",
    )
    _add_config(parser)


def _status(args: argparse.Namespace) -> int:
    from autoscaler.status import run_status

    return run_status(args.admin, args.config, as_json=args.json, watch=args.watch)


# --- emulator ---------------------------------------------------------------------------


def _emulator_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=_given,
        metavar="HOST:PORT",
        help="API address, loopback only (default 127.0.0.1:4280; port 0: a free one, printed)",
    )
    parser.add_argument(
        "--token",
        type=_given,
        help="accepted API token (default: $EMULATOR_TOKEN, else a random one, printed: a token"
        " given is not)",
    )
    parser.add_argument(
        "--state-file", type=_given, metavar="PATH", help="keep apps and machines here"
    )
    parser.add_argument(
        "--app",
        action="append",
        metavar="NAME=N[:IMAGE][@REGION,...]",
        help="create app NAME with N stopped machines at start, spread over the regions "
        "(repeatable)",
    )
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="never answer 429 for Fly's limits"
    )
    parser.add_argument(
        "--profile",
        choices=("fast", "fly"),
        help="transition times: fast (default, for tests) or fly (Fly's documented times)",
    )
    parser.add_argument(
        "--ipv6",
        action="store_true",
        help="machines listen on ::1, their private_ip, as Fly's are IPv6 (one per port)",
    )
    faults = parser.add_argument_group("fault injection (off by default)")
    faults.add_argument("--latency", type=float, metavar="S", help="extra seconds per call")
    faults.add_argument("--error-rate", type=float, metavar="F", help="fraction answered 500")
    faults.add_argument("--rate-limit-rate", type=float, metavar="F", help="fraction answered 429")
    faults.add_argument(
        "--boot-failure-rate", type=float, metavar="F", help="fraction of boots that fail"
    )
    faults.add_argument(
        "--crash-after", type=float, metavar="S", help="kill each machine S seconds after start"
    )
    faults.add_argument(
        "--resume-cold-rate",
        type=float,
        metavar="F",
        help="fraction of resumes that lose the snapshot (a cold boot instead)",
    )
    faults.add_argument(
        "--hang-rate",
        type=float,
        metavar="F",
        help="fraction of starts after which the process hangs (accepts, never answers)",
    )
    faults.add_argument(
        "--answer-lost-rate",
        type=float,
        metavar="F",
        help="fraction of calls that change a machine carried out, then their answer lost"
        " (the connection closed)",
    )
    _add_config(parser)


def _emulator(args: argparse.Namespace) -> int:
    import os

    from autoscaler.emulator.main import main as emulator_main

    return emulator_main(args, os.environ)


# --- run --------------------------------------------------------------------------------


def _run_args(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument(
        "--listen",
        type=_given,
        metavar="HOST:PORT",
        help="address of the proxy (overrides proxy.listen; port 0: a free one, logged)",
    )
    parser.add_argument(
        "--admin-listen",
        type=_given,
        metavar="HOST:PORT",
        help="address of /metrics, /healthz, /readyz, /status (overrides admin.listen)",
    )
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="play the Machines API with the embedded emulator (overrides fly.api_url, "
        "as fly.api_url: embedded does); with no fly.api_url, run refuses to start without it",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="N processes serving one port (SO_REUSEPORT), coordinated through Redis: needs "
        "cluster.redis_url; worker i serves admin on the admin port plus i; SIGUSR2 to this "
        "process restarts the workers one at a time",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    # SIGHUP, SIGUSR2, SIGTERM and SIGINT are held back since main() began (HELD_SIGNALS):
    # Service.run (or the supervisor) delivers them once it has its handlers.
    from autoscaler.service import run

    overrides: dict[str, dict[str, str]] = {}
    if args.listen:
        overrides["proxy"] = {"listen": args.listen}
    if args.admin_listen:
        overrides["admin"] = {"listen": args.admin_listen}
    if args.workers > 1:
        from autoscaler.workers import supervise

        log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
        return supervise(
            args.config,
            overrides,
            args.workers,
            emulator=args.emulator,
            log_args=log_args,
            flags=RUN_FLAGS,
        )
    return run(args.config, overrides, emulator=args.emulator, flags=RUN_FLAGS)


# The flags of `run` that set a key, by that key path: a problem of the value one gave is
# said by the flag as typed (``--listen: ...``), not as ``command line: proxy.listen: ...``.
# (--emulator sets fly.api_url to embedded, a value with no problem of its own.)
RUN_FLAGS = {"proxy.listen": "--listen", "admin.listen": "--admin-listen"}


# --- demo -------------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=_given,
        metavar="PATH",
        help="demo config (default: the built-in one; needs an app 'demo' on the emulator)",
    )
    parser.add_argument(
        "--duration", type=float, default=90.0, metavar="S", help="length of the story (90)"
    )
    parser.add_argument(
        "--machines", type=int, metavar="N", help="machines of the app, 1 to 1000 (5)"
    )
    parser.add_argument(
        "--no-traffic",
        action="store_true",
        help="start everything, send nothing, run until Ctrl-C (try curl -H 'Host: demo')",
    )
    parser.add_argument(
        "--log-file",
        type=_given,
        metavar="PATH",
        help="where the logs go (default: autoscaler-demo.log in the system's temporary "
        "directory); the view shows the path",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="logs on the screen instead of a file (then plain progress lines, no live view)",
    )


def _demo(args: argparse.Namespace) -> int:
    from autoscaler.config import EMULATOR_APP_MACHINES
    from autoscaler.demo import main as demo_main

    # Each flag said with what it got: "--duration and --machines must be positive" left
    # the user to find which.
    if not (math.isfinite(args.duration) and args.duration > 0):
        print(
            f"autoscaler demo: --duration: expected seconds > 0, got {args.duration:g}",
            file=sys.stderr,
        )
        return 2
    if args.machines is not None and not 1 <= args.machines <= EMULATOR_APP_MACHINES:
        print(
            f"autoscaler demo: --machines: expected a number from 1 to"
            f" {EMULATOR_APP_MACHINES}, got {args.machines}",
            file=sys.stderr,
        )
        return 2
    return demo_main(
        args.config,
        args.duration,
        args.machines,
        not args.no_traffic,
        sys.stdout,
        log_file=args.log_file,
        verbose=args.verbose,
        log_level=args.log_level,
        log_format=args.log_format,
    )


# --- simulate ---------------------------------------------------------------------------


def _simulate_args(parser: argparse.ArgumentParser) -> None:
    # Defaults of the timings repeat autoscaler.sim.model.Timings (a test keeps them equal);
    # importing the simulator here would slow down every command's start.
    src = parser.add_argument_group("trace")
    src.add_argument("--trace", metavar="FILE", help="request trace to replay (.csv, .csv.gz)")
    src.add_argument(
        "--trace-format",
        choices=["auto", "csv", "azure"],
        default="auto",
        help="csv: t,app,duration per request (t: seconds from the trace's start, or Unix "
        "seconds, replayed from the first request); azure: Azure Functions 2019 per-minute "
        "invocation counts (default: auto, from the header)",
    )
    src.add_argument(
        "--duration-ms",
        type=float,
        default=100.0,
        metavar="MS",
        help="length of each request of an azure trace (default: 100)",
    )
    src.add_argument(
        "--app", action="append", metavar="NAME", help="only this app (repeatable; a prefix works)"
    )
    src.add_argument("--max-apps", type=int, metavar="N", help="only the N busiest apps")
    src.add_argument(
        "--horizon-s",
        type=float,
        metavar="S",
        help="replay this long, at most 366 days (default: the trace's end)",
    )
    pol = parser.add_argument_group("policy")
    pol.add_argument(
        "--config",
        type=_given,
        metavar="PATH",
        help="YAML config: apps[] by name, control.tick_s",
    )
    pol.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="policy knob for every app, over the config (repeatable), e.g. idle_to_zero_s=60",
    )
    pol.add_argument(
        "--strategies",
        default=None,
        help="comma-separated (default: autoscaler,fly-autostop,fixed-keepalive,always-on; "
        "with --frontier every strategy with a knob); also adaptive, knative, "
        "knative-<grace>s, fly-autostop-<interval>s, fixed-keepalive-<idle>s",
    )
    pol.add_argument(
        "--frontier",
        action="store_true",
        help="sweep each strategy's main knob: machine-seconds against waits, and each "
        "at fly-autostop's waits",
    )
    pol.add_argument(
        "--plot",
        metavar="FILE",
        help="with --frontier: draw it to FILE (.png or .svg; needs the plot extra)",
    )
    pol.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="replay N apps at once in worker processes (with --frontier: N knob values)",
    )
    pol.add_argument(
        "--every-tick",
        action="store_true",
        help="ask the policy on every tick, idle ones too (slower, same result)",
    )
    tim = parser.add_argument_group("modelled timings, seconds")
    for flag, default, what in (
        ("--tick-s", None, "controller tick (default: control.tick_s, else 1)"),
        ("--api-latency-s", 0.1, "each Machines API call"),
        ("--resume-s", 0.3, "suspended to started"),
        ("--start-s", 2.0, "stopped to started (cold boot)"),
        ("--suspend-s", 1.0, "started to suspended"),
        ("--stop-s", 1.0, "started to stopped"),
        ("--autostop-interval-s", 300.0, "fly-autostop's excess-capacity check"),
        ("--keepalive-s", 600.0, "fixed-keepalive's idle time before sleep"),
    ):
        shown = "" if default is None else f" (default: {default:g})"
        tim.add_argument(flag, type=float, default=default, metavar="S", help=what + shown)
    mod = parser.add_argument_group("modelled faults and routing (off by default)")
    mod.add_argument(
        "--resume-cold-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of resumes that fall back to a cold start",
    )
    mod.add_argument(
        "--snapshot-max-age-s",
        type=float,
        default=0.0,
        metavar="S",
        help="a machine suspended longer than this boots cold (0: never)",
    )
    mod.add_argument(
        "--action-failure-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of start and resume calls the API fails",
    )
    mod.add_argument(
        "--boot-failure-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of cold boots that end failed (our policy restarts the machine after a "
        "backoff, within apps[].max_restart_attempts; the baselines wake another)",
    )
    mod.add_argument(
        "--balance",
        choices=["least-loaded", "two-choices"],
        default="least-loaded",
        help="routing: the least loaded machine, or the proxy's two random choices",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--format", choices=["table", "json", "csv"], default="table")
    out.add_argument("--totals-only", action="store_true", help="leave out the per-app rows")
    gen = parser.add_argument_group("synthetic traces")
    gen.add_argument(
        "--generate",
        metavar="SHAPE",
        help="replay a synthetic trace instead of --trace: steady, diurnal, bursty, sparse, "
        "mixed-100-apps, timers, sessions, azure-like, memoryless",
    )
    gen.add_argument(
        "--out", metavar="FILE", help="write the --generate trace here and exit (.gz compresses)"
    )
    gen.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    gen.add_argument(
        "--hours", type=float, default=24.0, help="trace length, at most 8760 (default: 24)"
    )


def _simulate(args: argparse.Namespace) -> int:
    from autoscaler.sim.command import run

    return run(args)


_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Runner]] = [
    (
        "demo",
        "the whole system on the embedded emulator under ~90 s of built-in traffic",
        _demo_args,
        _demo,
    ),
    (
        "run",
        "run the proxy, the controller and the admin server (SIGHUP reloads the config;"
        " with --workers, SIGUSR2 restarts the workers one at a time)",
        _run_args,
        _run,
    ),
    (
        "check-config",
        "validate a config file and print a summary (exit 2 on problems; give the file"
        " once, as PATH or as --config)",
        _check_config_args,
        _check_config,
    ),
    (
        "status",
        "print the admin server's /status as a table: apps, machines, decisions (exit 1"
        " when it cannot be asked or its answer is unusable, 2 on a config problem or a bad"
        " --admin)",
        _status_args,
        _status,
    ),
    (
        "emulator",
        "run the Fly Machines API emulator (machines are local processes)",
        _emulator_args,
        _emulator,
    ),
    (
        "simulate",
        "replay a request trace through the policy and compare it with baselines",
        _simulate_args,
        _simulate,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    from autoscaler import __version__

    parser = argparse.ArgumentParser(
        prog="autoscaler",
        description="Scale Fly.io apps to zero and back: a waking reverse proxy and a "
        "policy loop over the Fly Machines API.",
    )
    parser.add_argument("--version", action="version", version=f"autoscaler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary, add_arguments, run in _COMMANDS:
        command = sub.add_parser(name, help=summary, description=summary)
        _add_logging(command)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


# SIGHUP (reload), SIGUSR2 (rolling restart) and SIGTERM end a process that has no handler
# for them (SIGINT raises KeyboardInterrupt wherever Python is). `autoscaler run` imports
# for a good part of a second before its event loop has its handlers: a reload asked for
# right after a start (a deploy, a config watcher) killed it, and so did a stop (exit -15,
# no `stopped` line). The console entry (autoscaler.__main__) holds them back before it
# imports this module, and main() before anything else; for `run` they stay held until
# Service.run (or the supervisor of --workers) has its handlers, which then see them (a
# SIGHUP: one reload once the service is up; a SIGTERM or SIGINT: a clean stop before
# anything starts). Every other command gets them back at once after parsing, with their
# default action (`status --watch` ends when its terminal does).
def main(argv: Sequence[str] | None = None, *, mask: Iterable[int] | None = None) -> int:
    """Run the command in ``argv`` (default: sys.argv's); ``mask`` is the signal mask to
    go back to, from a caller that has held back the signals already (the console entry:
    the mask now has them)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    mask = held if mask is None else mask
    output = _Output()
    try:
        try:
            result: int | SystemExit = _command(argv, mask, output)
        except SystemExit as exc:  # --help, --version, a usage error
            result = exc
        output.flush()
    except OSError as exc:
        broken_pipe = isinstance(exc, BrokenPipeError)
        if exc is not output.error and not broken_pipe:
            raise
        # stdout or stderr on a full disk, /dev/full, a dead terminal (EIO): one line, no
        # traceback. A reader that stopped (EPIPE: `autoscaler status --watch | head`) is
        # no error of ours: nothing said. What cannot be flushed is sent to /dev/null, so
        # the interpreter's last flush cannot fail again (exit 120).
        _settle(sys.stdout)
        if not broken_pipe:
            _say(f"autoscaler: cannot write the output: {exc.strerror or exc}")
        _settle(sys.stderr)
        return 1
    finally:
        output.restore()
    if isinstance(result, SystemExit):
        raise result
    return result


def _command(argv: Sequence[str] | None, mask: Iterable[int], output: _Output) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BaseException:  # --help, --version, a usage error: nothing held any longer
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if args.run is not _run:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    from autoscaler import logs

    # The logs bypass the watch: a log line that cannot be written is dropped, as ever, and
    # a busy proxy's line per request costs no extra call.
    logs.configure(level=args.log_level, fmt=args.log_format, stream=output.stdout or output.stderr)
    run: Runner = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


class _Output:
    """Watches sys.stdout and sys.stderr while main() runs, so that main() can tell a
    failure to write the command's output (ENOSPC, EIO, EPIPE) from any other OSError (a
    file the command cannot read, a socket). Each is replaced by a thin wrapper that keeps
    the last error a write or flush raised, even one the caller swallowed (argparse's
    --help and --version ignore a failed write and exit 0)."""

    def __init__(self) -> None:
        self.stdout: TextIO | None = sys.stdout  # None when closed (`cmd >&-`)
        self.stderr: TextIO | None = sys.stderr
        self.error: OSError | None = None
        self._wrappers: list[TextIO] = []
        if self.stdout is not None:
            sys.stdout = self._wrap(self.stdout)
        if self.stderr is not None:
            sys.stderr = self._wrap(self.stderr)

    def _wrap(self, stream: TextIO) -> TextIO:
        wrapper = cast(TextIO, _Watched(stream, self))
        self._wrappers.append(wrapper)
        return wrapper

    def flush(self) -> None:
        """Flush now, not at the interpreter's exit (where a failure is a line of
        "Exception ignored" and exit 120); raise the error any write met."""
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except ValueError:  # closed by the command
                pass
        if self.error is not None:
            raise self.error

    def restore(self) -> None:
        if self.stdout is not None and sys.stdout in self._wrappers:
            sys.stdout = self.stdout
        if self.stderr is not None and sys.stderr in self._wrappers:
            sys.stderr = self.stderr


class _Watched:
    __slots__ = ("_output", "_stream")

    def __init__(self, stream: TextIO, output: _Output) -> None:
        self._stream = stream
        self._output = output

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._output.error = exc
            raise

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._output.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _say(line: str) -> None:
    """One line on stderr, if stderr can take it (it may be on a full disk too)."""
    try:
        if sys.stderr is not None:
            print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _settle(stream: TextIO | None) -> None:
    """Flush the stream; if that fails, point its descriptor at /dev/null, where what is
    still buffered for it goes at the interpreter's exit instead of failing again."""
    if stream is None:
        return
    try:
        stream.flush()
        return
    except (OSError, ValueError):
        pass
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, ValueError):  # no descriptor (a test's capture): nothing to redirect
        pass


if __name__ == "__main__":
    sys.exit(main())
