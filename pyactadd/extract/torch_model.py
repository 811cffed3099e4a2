"""Loading a model into PyTorch for extraction, with a cache of GGUF models converted to float32.

transformers can read a GGUF file directly, but it dequantizes every tensor and rebuilds
the tokenizer and config in Python, which is slow even for a small model. Plain llama
files (the default model among them) are converted by :mod:`pyactadd.extract.gguf_weights`
instead, bit-identically and much faster; other architectures go through transformers.
Either way the first load of a GGUF file saves the converted weights as a Hugging Face
model directory (safetensors, float32) under :func:`cache_entry` (``<cache>/torch/<sha256[:16]>/``),
which later loads read instead (docs/performance.md has the timings). ``<cache>`` is
``$PYACTADD_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyactadd``, else ``~/.cache/pyactadd``.

torch and transformers are imported inside the functions so ``import pyactadd`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from pyactadd.errors import InputError
from pyactadd.files import atomic_write_text, remove_stale_temps, temp_path

if TYPE_CHECKING:
    import torch

    from pyactadd.extract.gguf_weights import ConversionPlan

logger = logging.getLogger(__name__)

CACHE_ENV = "PYACTADD_CACHE_DIR"
_INDEX_FILE = "gguf-index.json"
_DONE_FILE = "pyactadd-converted.json"  # written last inside the temp dir: its presence marks a complete entry
_KEY_HEX = 16

_lock = threading.Lock()
_last_loaded: tuple[tuple[str, int, int], object] | None = None


def cache_root() -> Path:
    """Return pyactadd's cache directory (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pyactadd"
    return Path.home() / ".cache" / "pyactadd"


def load_torch_model(model_path: str | os.PathLike[str], *, progress: bool = True) -> torch.nn.Module:
    """Load a GGUF file or a Hugging Face model directory as a float32 CPU model in eval mode.

    The most recently loaded model is kept in memory and returned again for the same
    unchanged file, so treat it as shared: remove any hooks you add. Callers run it under
    ``torch.inference_mode()``. With ``progress``, one line goes to stderr when a GGUF
    file is converted (its first use).

    Raises:
        InputError: the path does not exist or transformers cannot load it.
    """
    global _last_loaded
    path = Path(model_path).resolve()
    try:
        stat = path.stat()
    except OSError:
        raise InputError(f"no such model file: {model_path}") from None
    identity = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if _last_loaded is not None and _last_loaded[0] == identity:
            return _last_loaded[1]  # type: ignore[return-value]
        # Drop the previous model before loading the next: two may not fit in memory.
        _last_loaded = None
        model = _load_hf_dir(path) if path.is_dir() else _load_gguf(path, stat, progress=progress)
        _last_loaded = (identity, model)
        return model


def clear_loaded_model() -> None:
    """Forget the in-memory model kept by :func:`load_torch_model`."""
    global _last_loaded
    with _lock:
        _last_loaded = None


def model_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return the list of transformer blocks (``model.model.layers`` for llama, gemma3, qwen2, mistral).

    Raises:
        InputError: the model class keeps its blocks somewhere else.
    """
    import torch

    inner = getattr(model, "model", None)
    # Multimodal wrappers (gemma3 with vision) nest the language model one level deeper.
    for candidate in (inner, getattr(inner, "language_model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise InputError(
        f"don't know where {type(model).__name__} keeps its transformer blocks (expected model.model.layers): "
        "use a llama-, gemma3-, qwen2- or mistral-style model"
    )


def model_n_layer(model: torch.nn.Module) -> int:
    """Return the number of transformer blocks of a loaded model."""
    return len(model_blocks(model))


def model_n_embd(model: torch.nn.Module) -> int:
    """Return the width of the residual stream of a loaded model."""
    return int(model.get_input_embeddings().weight.shape[1])


def _load_hf_dir(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), device_map=None, output_loading_info=True, **_float32_kwargs()
            )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"transformers cannot load the model in {path}: {exc}") from None
    # transformers fills missing weights with random values and only logs it; refuse instead.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(
            f"the model in {path} lacks {len(missing)} weights (e.g. {missing[0]}): re-download or re-convert it"
        )
    return model.eval()


def _load_cached(entry: Path) -> torch.nn.Module:
    """A converted cache entry: plain llama checkpoints skip transformers (see llama_lite)."""
    from pyactadd.extract import llama_lite

    config = json.loads((entry / "config.json").read_text(encoding="utf-8"))
    if llama_lite.supports(config) and (entry / llama_lite.WEIGHTS_FILE).is_file():
        return llama_lite.LlamaLite.from_dir(entry)
    return _load_hf_dir(entry)


def _load_gguf(path: Path, stat: os.stat_result, *, progress: bool) -> torch.nn.Module:
    entry = cache_entry(path, stat=stat)
    # Half-written entries of runs killed outright (SIGKILL) are hundreds of MB each;
    # their names carry the writer's pid, so those whose writer is gone can go.
    remove_stale_temps(entry.parent)
    if (entry / _DONE_FILE).is_file():
        try:
            return _load_cached(entry)
        except Exception as exc:  # a half-deleted or corrupt entry: convert again
            logger.warning("cached weights in %s are unreadable (%s); converting %s again", entry, exc, path.name)
    _discard(entry)
    plan = _direct_plan(path)
    if progress:
        print(f"Converting GGUF to PyTorch weights (once per model; cached in {entry})", file=sys.stderr, flush=True)
    if plan is not None:
        from pyactadd.extract import llama_lite  # imports torch: after the message, which should come at once

        # read_plan only writes configs llama_lite reproduces; this guards a stricter llama_lite.
        if llama_lite.supports(plan.config):
            return _convert_direct(plan, entry)
    model = _convert_gguf(path)
    try:
        _write_entry(entry, source=path, save=lambda tmp: _save_pretrained(model, tmp))
    except OSError as exc:
        # The cache is an optimisation: a read-only or full disk must not stop extraction.
        logger.warning("could not cache converted weights in %s: %s", entry, exc)
    return model


def _direct_plan(path: Path) -> ConversionPlan | None:
    """The transformers-free conversion plan for ``path``, or None when transformers must convert it."""
    from pyactadd.extract import gguf_weights

    try:
        return gguf_weights.read_plan(path)
    except gguf_weights.Unsupported as exc:
        logger.debug("converting %s with transformers: %s", path.name, exc)
        return None


def _convert_direct(plan: ConversionPlan, entry: Path) -> torch.nn.Module:
    """Convert a plain llama GGUF without transformers, cache it, and return it as a LlamaLite model."""
    from pyactadd.extract import gguf_weights
    from pyactadd.extract import llama_lite

    try:
        weights = gguf_weights.convert(plan)
    except (OSError, ValueError, NotImplementedError) as exc:
        raise InputError(f"cannot convert {plan.path.name} to PyTorch: {exc}") from None
    try:
        _write_entry(entry, source=plan.path, save=lambda tmp: gguf_weights.write_checkpoint(tmp, plan.config, weights))
    except OSError as exc:
        logger.warning("could not cache converted weights in %s: %s", entry, exc)
    # The same tensors a warm load would read back from the entry, without reading them back.
    return llama_lite.LlamaLite(weights, plan.config).eval()


def _convert_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, device_map=None, **_float32_kwargs()
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(
            f"transformers cannot convert {path.name} to PyTorch ({exc}): "
            "check that transformers supports this GGUF architecture, or pass a Hugging Face model directory"
        ) from None
    # The weights are dequantized float32 now; drop the GGUF quantizer so save_pretrained
    # (which refuses "quantized" models) writes a plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    return model.eval()


def _float32_kwargs() -> dict[str, object]:
    """``dtype=float32`` under the keyword this transformers understands (``torch_dtype`` before 4.56)."""
    import torch
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def _save_pretrained(model: torch.nn.Module, directory: Path) -> None:
    with _quiet_transformers():
        model.save_pretrained(str(directory), safe_serialization=True)


def _write_entry(entry: Path, *, source: Path, save: Callable[[Path], None]) -> None:
    """Create cache ``entry`` atomically: ``save`` fills a temporary directory that is then renamed."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(entry)  # a name with this process's pid, for remove_stale_temps
    tmp.mkdir()
    try:
        save(tmp)
        (tmp / _DONE_FILE).write_text(json.dumps({"source": str(source)}) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / _DONE_FILE).is_file():
                raise
            # Another process finished the same conversion first; its copy is as good.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(entry: Path) -> None:
    """Remove an incomplete or corrupt cache entry (renamed first, so readers never see it half-deleted)."""
    if not entry.exists():
        return
    doomed = temp_path(entry)  # a kill during the removal leaves a folder the next run removes
    try:
        os.rename(entry, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def cache_entry(model_path: str | os.PathLike[str], *, root: Path | None = None, stat: os.stat_result | None = None) -> Path:
    """The cache directory that holds (or will hold) the converted weights of a GGUF file.

    ``root`` defaults to :func:`cache_root`. The directory is complete when
    :func:`load_torch_model` has converted the file; it holds ``config.json`` and
    ``model.safetensors`` as ``save_pretrained`` writes them.
    """
    path = Path(model_path).resolve()
    root = cache_root() if root is None else root
    return root / "torch" / cache_key(path, root=root, stat=stat)


def cache_key(path: Path, *, root: Path | None = None, stat: os.stat_result | None = None) -> str:
    """First 16 hex digits of the file's sha256, remembered by (path, size, mtime) to hash each file once.

    The index lives in ``root`` (default :func:`cache_root`); ``stat`` is the file's, when known.
    """
    root = cache_root() if root is None else root
    stat = path.stat() if stat is None else stat
    index_path = root / _INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if (
        isinstance(known, dict)
        and known.get("size") == stat.st_size
        and known.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(known.get("sha256"), str)
    ):
        return known["sha256"][:_KEY_HEX]
    digest = _sha256(path)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True), error=InputError)
    except (OSError, InputError) as exc:
        # The index only saves hashing again: a read-only cache must not stop extraction.
        logger.warning("could not update %s: %s", index_path, exc)
    return digest[:_KEY_HEX]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and warnings while loading or saving; errors still raise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF dequantizing loop uses a bare tqdm that ignores the switch above.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bare_tqdm = getattr(gguf_utils, "tqdm", None)
    if bare_tqdm is not None:
        gguf_utils.tqdm = functools.partial(bare_tqdm, disable=True)
    try:
        yield
    finally:
        if bare_tqdm is not None:
            gguf_utils.tqdm = bare_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
