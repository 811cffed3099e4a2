"""``pyactadd inspect``: what a steering file is, where its layers go, and who can load it.

The model a file is checked against comes in as a :class:`TargetModel` (a fingerprint the
caller read, or why there is none): reading models is a later stage's job.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyactadd.errors import InputError, ModelMismatchError
from pyactadd.vector.fingerprint import ModelFingerprint
from pyactadd.vector.gguf_file import TensorRecord, stock_problem
from pyactadd.vector.layers import to_llama_index
from pyactadd.vector.value import SteeringVector
from pyactadd.vector.convert.reading import Loaded, load
from pyactadd.vector.convert.tensor_files import describe_metadata, read_tensor_file, sniff


@dataclass(frozen=True)
class TargetModel:
    """The model :func:`inspect_file` checks a file against."""

    name: str | None  # what the report names (the model's path)
    fingerprint: ModelFingerprint | None
    problem: str | None = None  # why the fingerprint is unknown


def inspect_file(
    path: str | os.PathLike[str],
    *,
    layer_convention: str | None = None,
    shift_layers: bool = False,
    layers: list[int] | None = None,
    stacked: bool = False,
    model: TargetModel | None = None,
) -> dict[str, Any]:
    """Describe any steering file pyactadd reads, as plain data (``pyactadd inspect --json``).

    A tensor file whose layer convention is unknown is still described (names, shapes,
    norms), with ``layers`` set to ``None`` and a note asking for ``--layer-convention``.
    ``model`` is the model the ``fits`` entry checks (``pyactadd inspect`` passes
    ``--model`` or the default model); without it the fit is unknown.

    Raises:
        SteeringFileError: the file cannot be read.
        InputError: options that do not fit the file.
    """
    file = Path(path)
    kind = sniff(file)
    try:
        loaded = load(file, layer_convention=layer_convention, shift_layers=shift_layers, layers=layers, stacked=stacked)
    except InputError as exc:
        if kind == "gguf" or layer_convention is not None or shift_layers or layers or stacked:
            raise
        return _unmapped(file, kind, str(exc), model)
    return _mapped(file, loaded, model)


def _mapped(file: Path, loaded: Loaded, model: TargetModel | None) -> dict[str, Any]:
    vector = loaded.vector
    norms = {layer: np.linalg.norm(r.astype(np.float64), axis=1) for layer, r in vector.layers.items()}
    tensors = []
    by_name = {t["name"]: t for t in loaded.tensors}
    for layer in vector.layer_ids:
        name = loaded.file_keys.get(layer, "")
        stored = by_name.get(name, {"name": name, "type": "float32", "shape": list(vector.layers[layer].shape)})
        tensors.append({**stored, "block_input": layer, "block_output": to_llama_index(layer), "row_norms": norms[layer].tolist()})
    loadable, reason = _stock_verdict(file, loaded)
    report: dict[str, Any] = {
        "path": str(file),
        "kind": loaded.kind,
        "format": _format_name(loaded),
        "producer": loaded.producer,
        "format_version": loaded.format_version,
        "evidence": list(loaded.evidence),
        "notes": list(loaded.notes),
        "layout": "vector" if vector.n_positions == 1 else "per_position",
        "n_positions": vector.n_positions,
        "n_embd": vector.n_embd,
        "alignment": vector.alignment,
        "coefficient": vector.coefficient,
        "layers": {
            "block_input": vector.layer_ids,
            "block_output": [to_llama_index(layer) for layer in vector.layer_ids],
            "file_names": [loaded.file_keys.get(layer) for layer in vector.layer_ids],
        },
        "tensors": tensors,
        "metadata": _plain(loaded.metadata if loaded.kind == "gguf" else describe_metadata(loaded.metadata)),  # type: ignore[arg-type]
        "prompts": {"positive": vector.positive, "negative": vector.negative},
        "fingerprint": dataclasses.asdict(vector.fingerprint),
        "model_hint": vector.model_hint,
        "backend": _backend(loaded),
        "fits": _fits(vector.n_embd, vector, model),
        "llama_cpp": {"loadable": loadable, "reason": reason},
    }
    if loaded.origin is not None and loaded.origin.producer == "cvector-generator":
        report["cvector_generator"] = _cvector_generator(vector, loaded.origin.n_layer_hint)
    return report


def _backend(loaded: Loaded) -> str | None:
    """What made a pyactadd file's rows: ``pyactadd.extra.backend`` (written by the llama backend only), else torch;
    None for other writers' files."""
    if loaded.producer != "pyactadd":
        return None
    return str(loaded.vector.extra.get("backend", "torch"))


def _stock_verdict(file: Path, loaded: Loaded) -> tuple[bool, str | None]:
    """Whether stock llama.cpp loads the file as stored (--shift-layers and --layer change only pyactadd's reading)."""
    if loaded.kind != "gguf":
        return False, f"a {loaded.kind} file is not GGUF: `pyactadd convert {file.name} OUT.gguf --llama-cpp ...`"
    records = []
    for t in loaded.tensors:
        il = int(t["name"].split(".", 1)[1])
        records.append(TensorRecord(t["name"], il, il + 1, t["type"], tuple(t["shape"])))
    reason = stock_problem(records)
    return reason is None, reason


def _cvector_generator(vector: SteeringVector, n_layer_hint: int | None) -> dict[str, Any]:
    shifted = "shifted_layers" in vector.extra
    return {
        "shifted": shifted,
        "computed_at_block_input": vector.layer_ids if shifted else [layer - 1 for layer in vector.layer_ids],
        "llama_cpp_applies_at_block_input": [layer + 1 for layer in vector.layer_ids] if shifted else vector.layer_ids,
        "n_layer_hint": n_layer_hint,
    }


def _unmapped(file: Path, kind: str, why: str, model: TargetModel | None) -> dict[str, Any]:
    found = read_tensor_file(file, kind)
    tensors = []
    for entry in found.entries:
        rows = entry.array.reshape(-1, entry.array.shape[-1]) if entry.array.ndim > 1 else entry.array.reshape(1, -1)
        tensors.append(
            {
                "name": entry.key or "(lone array)",
                "type": entry.dtype,
                "shape": list(entry.array.shape),
                "block_input": None,
                "block_output": None,
                "row_norms": np.linalg.norm(rows.astype(np.float64), axis=1).astype(np.float32).tolist(),
            }
        )
    n_embd = found.entries[0].array.shape[-1]
    return {
        "path": str(file),
        "kind": kind,
        "format": f"{kind} tensors",
        "producer": "tensors",
        "format_version": None,
        "evidence": [f"{kind} file with {len(found.entries)} array(s)"],
        "notes": [why],
        "layout": None,
        "n_positions": None,
        "n_embd": n_embd,
        "alignment": None,
        "coefficient": None,
        "layers": None,
        "tensors": tensors,
        "metadata": _plain(describe_metadata(found.metadata)),
        "prompts": {"positive": None, "negative": None},
        "fingerprint": None,
        "model_hint": None,
        "backend": None,
        "fits": _fits(n_embd, None, model),
        "llama_cpp": {"loadable": False, "reason": f"a {kind} file is not GGUF: convert it with `pyactadd convert`"},
    }


def _fits(n_embd: int, vector: SteeringVector | None, model: TargetModel | None) -> dict[str, Any]:
    if model is None or model.fingerprint is None:
        reason = "no model given to check against" if model is None else model.problem
        return {"model": None if model is None else model.name, "fits": None, "reason": reason}
    fingerprint = model.fingerprint
    result = {"model": model.name, "model_fingerprint": dataclasses.asdict(fingerprint)}
    if vector is None:
        ok = n_embd == fingerprint.n_embd
        reason = None if ok else f"width {n_embd} != the model's n_embd {fingerprint.n_embd}"
        return {**result, "fits": ok, "reason": reason}
    try:
        vector.check_fits(fingerprint)
    except ModelMismatchError as exc:
        return {**result, "fits": False, "reason": str(exc)}
    return {**result, "fits": True, "reason": None}


def _format_name(loaded: Loaded) -> str:
    if loaded.kind != "gguf":
        return f"{loaded.kind} tensors" + (" written by pyactadd" if len(loaded.evidence) > 1 else "")
    names = {
        "pyactadd": f"pyactadd steering file (format version {loaded.format_version})",
        "cvector-generator": "llama.cpp control vector from cvector-generator",
        "repeng": "llama.cpp control vector from repeng (export_gguf)",
        "dialz": "dialz steering vector (llama.cpp layout, architecture 'steeringvector')",
        "llama.cpp": "llama.cpp control vector (writer unknown)",
    }
    return names[loaded.producer]


def _plain(metadata: dict[str, Any]) -> dict[str, Any]:
    plain = {}
    for key, value in metadata.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, (list, tuple)):
            value = [item.item() if isinstance(item, np.generic) else item for item in value]
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        plain[key] = value
    return plain


def render_text(report: dict[str, Any], *, max_norms: int = 8) -> str:
    """The report as aligned lines for a terminal."""
    lines = [f"file        {report['path']}", f"format      {report['format']}"]
    if report["layout"] is not None:
        rows = report["n_positions"]
        lines.append(
            f"layout      {report['layout']}: {rows} row{'s' if rows != 1 else ''} x {report['n_embd']}, "
            f"alignment {report['alignment']}, coefficient {report['coefficient']:g}"
        )
    else:
        lines.append(f"layout      unknown until the layer convention is known; width {report['n_embd']}")
    lines += _layer_lines(report)
    prompts = report["prompts"]
    if prompts["positive"] is not None or prompts["negative"] is not None:
        lines.append(f"prompts     {prompts['positive']!r} - {prompts['negative']!r}")
    fingerprint = report["fingerprint"]
    if fingerprint is not None:
        made = ", ".join(f"{k} {v}" for k, v in fingerprint.items() if v is not None and k != "architecture")
        hint = report.get("cvector_generator", {}).get("n_layer_hint")
        if hint is not None and fingerprint.get("n_layer") is None:
            made += f"; {hint - 1} vectors from cvector-generator suggest n_layer {hint}"
        lines.append(f"made for    {fingerprint['architecture'] or 'an unknown architecture'} ({made})")
    if report.get("backend") is not None:
        how = {"torch": "PyTorch, float32", "llama": "llama.cpp, the model file's own weights"}.get(report["backend"], "")
        lines.append(f"backend     {report['backend']}" + (f" ({how})" if how else ""))
    fits = report["fits"]
    if fits["fits"] is None:
        lines.append(f"fits        unknown: {fits['reason']}")
    else:
        verdict = "yes" if fits["fits"] else f"no: {fits['reason']}"
        lines.append(f"fits        {Path(fits['model']).name if fits['model'] else 'the model'}: {verdict}")
    stock = report["llama_cpp"]
    lines.append(f"llama.cpp   {'loads it' if stock['loadable'] else 'refuses it: ' + str(stock['reason'])}")
    lines.append("tensors")
    for tensor in report["tensors"]:
        where = "" if tensor["block_input"] is None else f"  L {tensor['block_input']}"
        norms = tensor["row_norms"]
        shown = " ".join(f"{n:.4g}" for n in norms[:max_norms]) + (" …" if len(norms) > max_norms else "")
        lines.append(f"  {tensor['name']:<14} {tensor['type']:<8} {str(tensor['shape']):<12}{where}  norms {shown}")
    if report["metadata"]:
        lines.append("metadata")
        for key, value in report["metadata"].items():
            text = repr(value)
            lines.append(f"  {key} = {text if len(text) <= 80 else text[:79] + '…'}")
    for title, key in (("detected", "evidence"), ("notes", "notes")):
        if report[key]:
            lines.append(title)
            lines.extend(f"  - {item}" for item in report[key])
    return "\n".join(lines)


def _layer_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    layers = report["layers"]
    if layers is not None:
        lines.append(f"layers      block input L (pyactadd):        {_ints(layers['block_input'])}")
        lines.append(f"            block output il (llama.cpp):     {_ints(layers['block_output'])}")
    if "cvector_generator" in report:
        info = report["cvector_generator"]
        lines.append(f"            computed at block input:         {_ints(info['computed_at_block_input'])}")
        lines.append(f"            llama.cpp applies at block input: {_ints(info['llama_cpp_applies_at_block_input'])}")
    return lines


def _ints(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)
