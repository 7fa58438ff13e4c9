"""Shared fixtures: small datasets written in the real formats."""

from __future__ import annotations

import pytest

from dst_train.data.synthetic import DemoSpec, make_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A 6-video demo dataset (both TSV styles, every split), made once per test session."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, seed=3, spec=DemoSpec(videos=6, image_size=32))
    return root


@pytest.fixture
def world_of_one(monkeypatch):
    """For a test that builds the DeepSpeed engine in the pytest process: the process-group
    variables are set here and restored after the test. Left behind (``init_distributed`` sets
    them for a plain process), every process a later test starts inherited this process's port,
    which it still listens on, and failed with "address already in use"."""
    from dst_train.engine.trainer import free_port

    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**world, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def write_tsv(path, rows, header="type\tid\tstart_ts\tend_ts\tname"):
    """Write a DST TSV from tuples (type, id, start, end, name); None/'' means empty."""
    lines = [header] + ["\t".join("" if c is None else str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(demo_root, tmp_path_factory):
    """A tiny random SmolVLM folder (tokenizer trained on the demo texts), made once."""
    from dst_train.model.tiny import demo_corpus, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), demo_corpus(demo_root), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(demo_root, tmp_path_factory):
    """A tiny random Qwen2.5-VL folder (the second backbone family), made once."""
    from dst_train.model.tiny import demo_corpus, make_tiny_model

    out = tmp_path_factory.mktemp("tiny-qwen")
    return make_tiny_model(out, demo_corpus(demo_root), seed=0, family_name="qwen2.5-vl")


@pytest.fixture(params=["smolvlm", "qwen2.5-vl"])
def tiny_family_dir(request):
    """The tiny model folder of each backbone family in turn."""
    name = {"smolvlm": "tiny_model_dir", "qwen2.5-vl": "tiny_qwen_dir"}[request.param]
    return request.getfixturevalue(name)


def tiny_run_config(demo_root, tiny_model_dir, *overrides):
    """A RunConfig for the tiny model on the demo data, with ``key=value`` overrides."""
    from dst_train.config import load_config

    return load_config(None, [f"data.root={demo_root}", f"model.arch={tiny_model_dir}", *overrides])


def adding_special_tokens(tok):
    """A copy of ``tok`` that, like Llama-style tokenizers, adds BOS and an end token to every
    call unless told not to (``add_special_tokens=False``)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from dst_train.model.backbone import ChatFormat

    adding = copy.deepcopy(tok)
    bos, eos = ChatFormat().bos, ChatFormat().end
    adding.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in (bos, eos)],
    )
    assert adding("Hi")["input_ids"] == [tok.convert_tokens_to_ids(bos), *tok("Hi")["input_ids"],
                                          tok.convert_tokens_to_ids(eos)]  # fmt: skip
    return adding
