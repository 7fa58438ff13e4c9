"""``dst-train cache-features``: a build cut short resumes with only the videos it lacks, a
folder of another model's features is refused by name, and one process per GPU (under the
deepspeed launcher) builds the cache one process builds."""

import json
import re
import subprocess
import sys

import pytest
import torch

from dst_train.data.proassist import DataFormatError
from dst_train.model.backbone import load_image_processor, load_tokenizer
from dst_train.model.frames import FeatureCache, backbone_cache_key, build_feature_cache
from tests.engine.helpers import REPO
from tests.model.test_model import _setup


class Crash(Exception):
    pass


class Tower:
    """The tiny model's backbone, whose ``frame_features`` counts its calls and, after
    ``crash_after`` calls, raises (a kill mid-build)."""

    def __init__(self, demo_root, tiny_model_dir):
        from dst_train.data.pipeline import make_dataset

        cfg, model, _ = _setup(demo_root, tiny_model_dir)
        self.backbone, self.proc = model.backbone, load_image_processor(cfg.model.arch)
        self.key = backbone_cache_key(self.backbone, self.proc.image_size)
        ds = make_dataset(cfg, "train", load_tokenizer(cfg.model.arch), self.backbone, self.proc)
        self.files = sorted({s.frames_file for s in ds.samples})
        self.root, self.calls, self.crash_after = demo_root, 0, None
        real = self.backbone.frame_features

        def frame_features(px):
            if self.crash_after is not None and self.calls == self.crash_after:
                raise Crash
            self.calls += 1
            return real(px)

        self.backbone.frame_features = frame_features

    def build(self, out, key=None, crash_after=None) -> list[int]:
        self.calls, self.crash_after = 0, crash_after
        return build_feature_cache(
            self.backbone, self.root, self.files, out, self.proc, key or self.key, batch_size=1000
        )  # one call per video at this batch size


def _arrows(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.arrow"))}


def test_a_build_cut_short_resumes_with_only_the_videos_it_lacks(
    demo_root, tiny_model_dir, tmp_path
):
    tower = Tower(demo_root, tiny_model_dir)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    n = len(tower.files)
    assert n >= 3 and tower.build(whole) == [n] and tower.calls == n
    all_files, tower.files = tower.files, tower.files[:1]
    tower.build(cut)  # complete with 1 video; then the dataset grows and a build is cut short
    tower.files = all_files
    with pytest.raises(Crash):
        tower.build(cut, crash_after=1)
    with pytest.raises(DataFormatError, match="no cache.json"):
        FeatureCache(cut, tower.key)  # training refuses the half-built folder
    assert len(_arrows(cut)) == 2
    assert tower.build(cut) == [n - 2] and tower.calls == n - 2  # the 2 finished: not again
    assert _arrows(cut) == _arrows(whole)
    index = json.loads((cut / "cache.json").read_text())
    assert index == json.loads((whole / "cache.json").read_text())
    assert index["videos"] == n and len(index["shape"]) == 2
    assert sorted(p.name for p in cut.iterdir() if p.is_file()) == ["cache.json"]
    assert tower.build(cut) == [0] and tower.calls == 0  # complete: nothing to do
    assert FeatureCache(cut, tower.key).info == index


def test_a_folder_of_another_models_features_is_refused_by_name(
    demo_root, tiny_model_dir, tmp_path
):
    tower = Tower(demo_root, tiny_model_dir)
    out = tmp_path / "cache"
    with pytest.raises(Crash):  # half built with another key
        tower.build(out, key="other-key", crash_after=1)
    for _ in range(2):  # half built, then complete: either way not this model's features
        with pytest.raises(DataFormatError, match=f"{out}: .*other-key.*remove it or choose"):
            tower.build(out)
        assert tower.calls == 0
        tower.build(out, key="other-key")
    (out / "cache.json").write_text('{"key": ')  # torn by hand: named, not a bare JSON error
    for read in (tower.build, FeatureCache):  # building on it, and training from it
        with pytest.raises(DataFormatError, match=f"{out / 'cache.json'}: not a feature cache's"):
            read(out)


def test_one_process_per_gpu_builds_the_cache_one_process_builds(
    demo_root, tiny_model_dir, tmp_path
):
    """``deepspeed --num_gpus 2 --module dst_train.cli cache-features ...``: each process caches
    every other video (on its own GPU; 2 CPU processes here), rank 0 writes the index."""
    from dst_train.engine.trainer import free_port

    def run(out, *launcher):
        args = [*launcher, "dst_train.cli", "cache-features", "--config", "/dev/null"]
        args += ["--out", str(out), f"data.root={demo_root}", f"model.arch={tiny_model_dir}"]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = r"wrote feature cache \S+ \((.*) videos computed by (\d) process"
        return re.findall(said, proc.stdout)

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    port = str(free_port())
    said = [run(tmp_path / "one", sys.executable, "-m"),
            run(tmp_path / "two", *launcher, "--master_port", port, "--module")]  # fmt: skip
    a, b = _arrows(tmp_path / "one"), _arrows(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) >= 3
    half = -(-len(a) // 2)
    assert said == [[(str(len(a)), "1")], [(f"{half} + {len(a) - half}", "2")]]  # rank 0 says
    index = [json.loads((tmp_path / d / "cache.json").read_text()) for d in ("one", "two")]
    assert index[0] == index[1]
    for name in a:  # each process runs on fewer threads (the launcher's OMP_NUM_THREADS)
        video = name[: -len(".arrow")]
        x, y = (FeatureCache(tmp_path / d).load(video, [0, 1]) for d in ("one", "two"))
        torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3)


def test_reading_a_cache_names_what_it_lacks(demo_root, tiny_model_dir, tmp_path):
    """Training reads a complete cache: a video it lacks, frames past a video's rows and another
    model's key are named; no frames is an empty (0, P, Dv) tensor."""
    tower = Tower(demo_root, tiny_model_dir)
    tower.files = tower.files[:1]
    out = tmp_path / "cache"
    tower.build(out)
    cache = FeatureCache(out, tower.key)
    video = tower.files[0]
    index = json.loads((out / "cache.json").read_text())
    first = cache.load(video, [0, 1])
    assert first.shape[0] == 2 and first.dtype == torch.float16
    assert cache.load(video, []).shape == (0, *index["shape"])
    with pytest.raises(DataFormatError, match=rf"{out / 'other'}\.arrow: no cached features"):
        cache.load("other", [0])
    with pytest.raises(DataFormatError, match=r"frames \[\d+, \d+\) past its \d+ rows"):
        cache.load(video, [10**6])
    with pytest.raises(DataFormatError, match=f"{out}: feature cache was built for another model"):
        FeatureCache(out, "another-key")
