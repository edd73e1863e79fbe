"""The served model as Ollama describes a model (/api/tags, /api/show, /api/ps): its details, the GGUF file's
metadata and tensors, the file's digest, the bytes it holds. Ollama's api/types.go names every field."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gguf import LlamaFileType

from appliance.serving.state import TAG, ServerState
from models.engine import Engine
from models.store import ModelStore

FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)  # Go's longest duration: what Ollama shows for keep_alive -1


def timestamp(when: datetime | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes times (now by default)."""
    return (when or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _modified(path: Path) -> str:
    return timestamp(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))


def _parameter_count(engine: Engine) -> int:
    return sum(math.prod(t.shape) for t in engine.model.file.tensors.values())


def _human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 134515008 -> "134.52M", 8030261248 -> "8.0B"."""
    for unit, size, digits in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= size:
            x = n / size
            return f"{x:.0f}{unit}" if x == int(x) else f"{x:.{digits}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def _quantization(metadata: dict) -> str:
    """The file type as Ollama names it ("Q4_1", "Q4_K_M", "F16")."""
    try:
        name = LlamaFileType(metadata["general.file_type"]).name
    except (KeyError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _details(engine: Engine) -> dict:
    metadata = engine.model.file.metadata
    family = metadata.get("general.architecture", "")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": _human_number(_parameter_count(engine)),
        "quantization_level": _quantization(metadata),
    }


@functools.lru_cache(maxsize=4)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    return ModelStore().sha256(path)


async def _digest(path: Path) -> str:
    """The file's SHA-256, read once per file (in a thread: a large file takes seconds)."""
    stat = path.stat()
    return await asyncio.to_thread(_sha256, path, stat.st_size, stat.st_mtime_ns)


async def listed(state: ServerState) -> dict:
    """The served model as /api/tags lists it."""
    path = Path(state.engine.model.file.path)
    name = state.model_name + TAG
    return {
        "name": name,
        "model": name,
        "modified_at": _modified(path),
        "size": path.stat().st_size,
        "digest": await _digest(path),
        "details": _details(state.engine),
    }


async def listed_all(state: ServerState) -> list[dict]:
    """/api/tags: the served model, then BASE+ADAPTER for each LoRA adapter loaded now (its own file's
    size and digest; details name the base as parent_model)."""
    base = await listed(state)
    entries = [base]
    for adapter in state.adapters.all():
        name = f"{state.model_name}+{adapter.name}{TAG}"
        entries.append(
            {
                **base,
                "name": name,
                "model": name,
                "modified_at": _modified(adapter.path),
                "size": adapter.path.stat().st_size,
                "digest": await _digest(adapter.path),
                "details": {**base["details"], "parent_model": base["name"]},
            }
        )
    return entries


@functools.lru_cache(maxsize=2)
def _weight_bytes(engine: Engine) -> int:
    """The weights this device holds for the model, as its backend prepared them (measured once: the
    measure prepares a zero tensor of each kind)."""
    model = engine.model
    return model.fixed_nbytes + sum(model.layer_nbytes(i) for a, b in engine.ranges for i in range(a, b))


def _held_bytes(state: ServerState) -> int:
    """What the model holds here: its weights and the running requests' caches."""
    return _weight_bytes(state.engine) + sum(t.job.session.nbytes for t in list(state.scheduler.active))


async def running(state: ServerState) -> dict:
    """The served model as /api/ps lists it while loaded (until a keep_alive 0 unloads it)."""
    entry = await listed(state)
    del entry["modified_at"]
    held = _held_bytes(state)
    return {
        **entry,
        "size": held,
        "expires_at": timestamp(datetime.now(timezone.utc) + FOREVER),
        "size_vram": held if state.engine.model.backend.name == "cuda" else 0,
        "context_length": state.engine.model.config.context_length,
    }


def _parameters(engine: Engine) -> list[tuple[str, object]]:
    """The settings this server runs the model with, as Ollama's PARAMETER lines name them."""
    tok = engine.tokenizer
    stops = sorted(tok.token_text(i) for i in tok.stop_ids)
    return [("num_ctx", engine.model.config.context_length)] + [("stop", s) for s in stops]


def shown(engine: Engine, verbose: bool) -> dict:
    """/api/show's answer. model_info is the file's metadata without general.name and the chat template (that
    is `template`), arrays over 5 long emptied unless verbose, general.parameter_count counted from the tensors."""
    path = Path(engine.model.file.path)
    metadata = dict(engine.model.file.metadata)
    metadata.pop("general.name", None)
    template = metadata.pop("tokenizer.chat_template", "") or ""
    if not verbose:
        metadata = {k: [] if isinstance(v, list) and len(v) > 5 else v for k, v in metadata.items()}
    metadata["general.parameter_count"] = _parameter_count(engine)
    parameters = _parameters(engine)
    return {
        "license": str(engine.model.file.metadata.get("general.license", "")),
        "modelfile": "\n".join(
            [f"# the appliance serves {path.name}; its chat template is the file's own", f"FROM {path}"]
            + [f"PARAMETER {k} {json.dumps(v)}" for k, v in parameters]
        ),
        "parameters": "\n".join(f"{k:<30} {json.dumps(v)}" for k, v in parameters),
        "template": template,
        "details": _details(engine),
        "model_info": dict(sorted(metadata.items())),
        "tensors": [
            {"name": t.name, "type": t.qtype.name, "shape": list(reversed(t.shape))}  # ggml's order
            for t in engine.model.file.tensors.values()
        ],
        "capabilities": ["completion", "tools"],  # tools: models/tools.py's format, the generic one if need be
        "modified_at": _modified(path),
    }
