"""Hub ids: a Hugging Face repository (and revision) to a local snapshot, cache first.

``EleutherAI/pythia-70m`` with ``revision="step3000"`` (or ``EleutherAI/pythia-70m@step3000``)
is Pythia-70M after 3,000 training steps; short names for common checkpoints are in
:data:`HUB_ALIASES`. The snapshot comes from the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``)
when it is there, is downloaded when online, and is otherwise a one-line error saying what to
download.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from mechscope.core.errors import MechscopeError

log = logging.getLogger(__name__)

_PYTHIA = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in _PYTHIA},
    **{f"pythia-{s}-deduped": f"EleutherAI/pythia-{s}-deduped" for s in _PYTHIA[2:]},
    "gpt-neo-125m": "EleutherAI/gpt-neo-125m",
    "gpt-neo-1.3b": "EleutherAI/gpt-neo-1.3B",
    "gpt-neo-2.7b": "EleutherAI/gpt-neo-2.7B",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "tinystories-33m": "roneneldan/TinyStories-33M",
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "gemma-2b": "google/gemma-2b",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
}

PATTERNS = [
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def split_revision(model_id: str, revision: str | None) -> tuple[str, str | None]:
    """``repo@rev`` -> (repo, rev); a ``revision`` argument wins over none in the id."""
    if "@" in model_id:
        model_id, _, rev = model_id.partition("@")
        if revision is not None and revision != rev:
            raise MechscopeError(f"two revisions given: {rev!r} in the id and {revision!r}")
        revision = rev
    return model_id, revision


def resolve_hub(model_id: str, revision: str | None = None) -> Path:
    """A local snapshot directory for a hub id: the cache first, then a download."""
    model_id, revision = split_revision(model_id, revision)
    repo = HUB_ALIASES.get(model_id.lower(), model_id)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - declared dependency
        raise MechscopeError("loading a hub id needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):  # huggingface_hub's reading
        raise MechscopeError(offline_message(model_id, repo, revision))
    host = hub_host_unresolved()
    if host:  # huggingface_hub would retry a connection for about 25 s first
        raise MechscopeError(offline_message(model_id, repo, revision) + f" (offline: {host} does not resolve)")
    hub_log = logging.getLogger("huggingface_hub")  # its retries print two warnings a try; -v shows them
    level = hub_log.level
    if not log.isEnabledFor(logging.INFO):
        hub_log.setLevel(logging.ERROR)
    try:
        log.info("downloading %s%s from the Hugging Face hub", repo, f" at {revision}" if revision else "")
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_patterns(repo, revision)))
    except Exception as e:
        gated = "gated" in type(e).__name__.lower() or "401" in str(e)
        hint = "; it is gated: accept its licence on huggingface.co and run `hf auth login`" if gated else ""
        raise MechscopeError(offline_message(model_id, repo, revision) + f" ({type(e).__name__}){hint}") from None
    finally:
        hub_log.setLevel(level)


def hub_host_unresolved() -> str:
    """The hub's host name when it cannot be resolved and no proxy is set (offline), else ""."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""  # the proxy resolves it
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror:
        return host
    except (OSError, UnicodeError):
        return ""
    return ""


def _patterns(repo: str, revision: str | None) -> list[str]:
    """Safetensors when the repository has them; the .bin files otherwise (Pythia's training steps)."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo, revision=revision)
    return PATTERNS if any(f.endswith(".safetensors") for f in files) else PATTERNS + BIN_PATTERNS


def offline_message(model_id: str, repo: str, revision: str | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    at = f" at revision {revision!r}" if revision else ""
    return (
        f"model {model_id!r}{at} is not in the Hugging Face cache and could not be downloaded; download "
        f"{repo} (config.json, model.safetensors or pytorch_model.bin, tokenizer.json) with "
        f"`hf download {repo}{rev}` on a machine with internet, or pass --model DIR pointing at a directory "
        "holding those files"
    )
