"""Find a model's files: a local folder as given, or a Hugging Face hub repo in the local cache.

``resolve_model_dir("gpt2")`` downloads (once, into huggingface_hub's cache) only what minisq
reads: config, tokenizer files and the safetensors weights. The pickled
``pytorch_model.bin`` is fetched only for repos that have no safetensors, as many
``facebook/opt-*`` repos do; :mod:`minisq.io.checkpoint` reads it without running its pickle.
huggingface_hub is imported only when a download is needed, so local folders work without it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

# What a hub download fetches: config, tokenizer, and safetensors weights (single or sharded).
HUB_FILES = [
    "config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
    "special_tokens_map.json", "generation_config.json",
]
# Added only when a repo has no safetensors: the torch.save weights, single or sharded.
HUB_BIN_FILES = ["pytorch_model.bin", "pytorch_model*.bin", "pytorch_model.bin.index.json"]

_OFFLINE_HELP = (
    "To work offline, pass a local folder that holds config.json and the weights, e.g. "
    "download it once with `hf download gpt2 --local-dir gpt2` (older huggingface_hub: "
    "`huggingface-cli download gpt2 --local-dir gpt2`) and call minisq.load('/path/to/gpt2'); "
    "or use `--model synthetic`, which needs no download"
)


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model folder for a folder path or a hub repo id ("gpt2", "facebook/opt-125m").

    An existing folder wins over a repo of the same name, as in transformers.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _checked_folder(path.resolve())
    if path.exists():
        raise CheckpointError(
            f"{path} is a file: pass the folder that holds config.json and the weights")
    if isinstance(name_or_path, Path) or _looks_like_path(str(name_or_path)):
        raise CheckpointError(f"there is no folder {path}. {_OFFLINE_HELP}")
    return _checked_folder(_download(str(name_or_path)))


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be a hub repo id ("owner/name" or "name") and mean a path."""
    return (name.startswith((".", "/", "~")) or name.endswith("/")
            or "\\" in name or name.count("/") > 1)


def _checked_folder(folder: Path) -> Path:
    """The folder, if it holds config.json; else say what it does hold."""
    if not ((folder / "config.json").is_file() or (folder / "minisq.json").is_file()):  # HF or model.save
        held = sorted(p.name for p in folder.iterdir())
        listing = ", ".join(held[:20]) + (", ..." if len(held) > 20 else "") if held else "nothing"
        raise CheckpointError(
            f"{folder} has no config.json (it holds: {listing}); a model folder needs the "
            "config.json and weights of a Hugging Face checkpoint")
    return folder


def _download(repo_id: str) -> Path:
    """snapshot_download of HUB_FILES, plus HUB_BIN_FILES when the repo has no safetensors."""
    try:
        import huggingface_hub  # noqa: PLC0415  (only needed for downloads)
    except ImportError as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to "
            f"download it (pip install huggingface_hub). {_OFFLINE_HELP}") from e
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=HUB_FILES + HUB_BIN_FILES))
    except Exception as e:  # offline, no cache, repo not found, bad id, network errors...
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and getting it from the Hugging Face hub failed: "
            f"the hub could not be reached or the repo was not found ({type(e).__name__}: "
            f"{reason}). {_OFFLINE_HELP}") from e
    return folder
