import dataclasses

import pytest
import torch

from dst_train.data.collate import LengthGroupedSampler, SampleDataset, make_collate
from dst_train.data.dataset import load_split
from dst_train.data.dst_tree import load_dst_tsv, parse_transitions
from dst_train.data.sequence import DST, IGNORE, RESPONSE, SequenceBuilder, SequenceTooLong
from dst_train.model.backbone import ChatFormat, load_image_processor, load_tokenizer
from dst_train.model.frames import FramePixels
from tests.conftest import adding_special_tokens

IMG = 3  # the tiny tokenizer's <image> id


@pytest.fixture(scope="module")
def parts(demo_root, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    labels = load_split(demo_root, "train")[0]
    tree = load_dst_tsv(demo_root / "dst" / f"{labels.clip.video_uid}.tsv")
    return tok, labels, tree


def _builder(tok, k=1, max_len=100_000):
    return SequenceBuilder(tok, ChatFormat(), IMG, k, max_len)


@pytest.mark.parametrize("k", [1, 4])
def test_layout_decisions_and_targets(parts, k):
    tok, labels, tree = parts
    (s,) = _builder(tok, k).build(labels, tree)
    assert s.frames == list(range(labels.start, labels.start + labels.num_frames))
    assert s.input_ids.count(IMG) == k * len(s.frames)
    for p in s.decision_pos:  # last token of a frame: an image token followed by a non-frame-start
        assert s.input_ids[p] == IMG and s.input_ids[p - k + 1 : p + 1] == [IMG] * k
    assert s.speak == labels.speak and s.update == labels.update
    # targets: the next token, only on response / DST bodies
    for p, (t, kind) in enumerate(zip(s.targets, s.target_kind, strict=True)):
        assert (t == IGNORE) == (kind == 0)
        if kind:
            assert t == s.input_ids[p + 1]
    text = {RESPONSE: [], DST: []}
    run, kind_now = [], 0
    for p, kind in enumerate(s.target_kind + [0]):
        if kind != kind_now and run:
            text[kind_now].append(tok.decode(run))
            run = []
        if kind:
            run.append(s.targets[p])
        kind_now = kind
    assert text[RESPONSE][0] == labels.responses[min(labels.responses)][0] + "<end_of_utterance>"
    assert text[DST][0] == labels.dst_updates[min(labels.dst_updates)] + "<end_of_utterance>"
    assert len(text[DST]) == sum(labels.update)


def test_a_tokenizer_that_adds_special_tokens_adds_none_inside_the_sequence(parts, tiny_model_dir):
    """Llama-style tokenizers add BOS (and some EOS) to every call by default; the pieces of a
    sequence are tokenized one by one, so that default would put one before every turn."""
    tok, labels, tree = parts
    adding = adding_special_tokens(tok)
    (plain,) = _builder(tok).build(labels, tree)
    (got,) = _builder(adding).build(labels, tree)
    assert got.input_ids == plain.input_ids and got.targets == plain.targets


def test_a_max_len_that_cannot_hold_the_prompt_or_a_frame_is_a_named_error(parts):
    tok, labels, tree = parts
    instruction = next(t.content for t in labels.clip.conversation if t.role == "system")
    prompt = len(_builder(tok).system_ids(instruction, tree, labels.initial_state))
    where = labels.clip.source
    with pytest.raises(SequenceTooLong, match=f"{where}: the system prompt alone is {prompt} "):
        _builder(tok, k=4, max_len=prompt + 3).build(labels, tree)
    # room for the prompt and a bare frame, not for a frame with the turns that follow it
    with pytest.raises(SequenceTooLong, match=rf"{where}: frame \d+ and the turns after it need"):
        _builder(tok, k=4, max_len=prompt + 4).build(labels, tree)


def test_long_clip_splits_at_boundaries_with_refreshed_state(parts):
    tok, labels, tree = parts
    full = _builder(tok).build(labels, tree)[0]
    head = len(_builder(tok).system_ids("", tree, labels.initial_state)) + 40
    limit = head + (len(full) - head) // 3
    chunks = _builder(tok, max_len=limit).build(labels, tree)
    assert len(chunks) >= 3
    assert all(len(c) <= limit for c in chunks)
    assert [f for c in chunks for f in c.frames] == full.frames  # every frame exactly once
    assert [c.source for c in chunks] == [f"{labels.clip.source}#{i}" for i in range(len(chunks))]
    assert sum(len(c.decision_pos) for c in chunks) == len(full.decision_pos)
    # each continuation starts with the system prompt showing the state reached so far
    state = dict(labels.initial_state)
    for chunk in chunks:
        head = tok.decode(chunk.input_ids[: chunk.input_ids.index(IMG)])
        assert head.startswith("<|im_start|>System: ")
        assert tree.render_state(state) in head
        for f in chunk.frames:
            if f in labels.dst_updates:
                state.update(parse_transitions(labels.dst_updates[f]))
    # labelled turns survive whole: same number of response/DST tokens overall
    for kind in (RESPONSE, DST):
        assert sum(c.target_kind.count(kind) for c in chunks) == full.target_kind.count(kind)


def test_a_clip_that_fits_max_seq_len_exactly_is_one_sample(parts):
    tok, labels, tree = parts
    full = _builder(tok).build(labels, tree)[0]
    (exact,) = _builder(tok, max_len=len(full)).build(labels, tree)
    assert exact.input_ids == full.input_ids
    chunks = _builder(tok, max_len=len(full) - 1).build(labels, tree)
    assert len(chunks) == 2


def test_a_second_system_turn_is_in_the_sequence_where_it_was_said(parts):
    """ProAssist puts the task knowledge in a second system turn after the first user turn: it
    stays in the stream (untrained), and only the first system turn becomes the prompt."""
    from dst_train.data.labels import Segment

    tok, labels, tree = parts
    first_frames = next(i for i, s in enumerate(labels.segments) if s.kind == "frames")
    knowledge = Segment("system", "Task knowledge: unscrew the wheels first", frame=labels.start)
    segments = list(labels.segments)
    segments.insert(first_frames + 1, knowledge)
    (plain,) = _builder(tok).build(labels, tree)
    (got,) = _builder(tok).build(dataclasses.replace(labels, segments=segments), tree)
    turn, _, _ = _builder(tok).turn_ids("system", knowledge.text)
    assert len(got) == len(plain) + len(turn)
    at = next(i for i in range(len(got)) if got.input_ids[i : i + len(turn)] == turn)
    assert at > got.input_ids.index(IMG)  # after a frame, not in the prompt
    assert got.targets[at : at + len(turn)] == [IGNORE] * len(turn)
    assert got.input_ids[:at] + got.input_ids[at + len(turn) :] == plain.input_ids


def test_a_clip_without_frames_makes_no_sample(parts):
    # nothing to decide and nothing to see: its turns alone would train the LM blind
    tok, labels, tree = parts
    blind = dataclasses.replace(labels, segments=[s for s in labels.segments if s.kind != "frames"])
    assert any(s.kind == "assistant" for s in blind.segments)
    assert _builder(tok).build(blind, tree) == []
    # ... also when its turns fill max_seq_len exactly (no frame's tokens are counted for them)
    builder = _builder(tok)
    instruction, *turns = [s for s in blind.segments if s.kind != "frames"]  # 1st: the system
    exact = len(builder.system_ids(instruction.text, tree, labels.initial_state)) + sum(
        len(builder.turn_ids(s.kind, s.text)[0]) for s in turns
    )
    assert _builder(tok, max_len=exact).build(blind, tree) == []
    with pytest.raises(SequenceTooLong):
        _builder(tok, max_len=exact - 1).build(blind, tree)


def test_turn_too_long_is_a_clear_error(parts):
    tok, labels, tree = parts
    with pytest.raises(ValueError, match="system prompt"):
        _builder(tok, max_len=50).build(labels, tree)


def test_collate_pads_and_orders_frames(parts, demo_root, tiny_model_dir):
    tok, labels, tree = parts
    samples = _builder(tok).build(labels, tree)
    other = load_split(demo_root, "train")[1]
    samples += _builder(tok).build(
        other, load_dst_tsv(demo_root / "dst" / f"{other.clip.video_uid}.tsv")
    )
    ds = SampleDataset(
        samples,
        FramePixels(demo_root, load_image_processor(str(tiny_model_dir))),
        negative_frame_keep=0.1,
        seed=1,
    )
    batch = make_collate(tok.pad_token_id, False)([ds[0], ds[1]])
    n0, n1 = len(samples[0]), len(samples[1])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"].sum().item() == n0 + n1
    d = len(samples[0].frames) + len(samples[1].frames)
    assert batch["pixel_values"].shape == (d, 3, 32, 32)
    assert batch["decision_index"][: len(samples[0].frames), 0].eq(0).all()
    rows, pos = batch["decision_index"].T
    assert batch["input_ids"][rows, pos].eq(IMG).all()
    # negatives subsampled (~10 % kept), positives always kept
    sw, sp = batch["speak_weight"], batch["speak"]
    assert sw[sp == 1].eq(1).all() and 0 < sw[sp == 0].mean() < 0.3
    # frames_device: each sample's frames copied into one tensor made on that device (on a GPU,
    # no host-side concatenation into a fresh tensor each step); the batch is otherwise the same
    items = [ds[0], ds[1]]
    placed = make_collate(tok.pad_token_id, False, frames_device=torch.device("cpu"))(items)
    assert placed.keys() == batch.keys()
    assert all(torch.equal(placed[k], batch[k]) for k in batch)
    meta = make_collate(tok.pad_token_id, False, frames_device=torch.device("meta"))(items)
    assert meta["pixel_values"].device.type == "meta" and meta["pixel_values"].shape[0] == d
    assert all(v.device.type == "cpu" for k, v in meta.items() if k != "pixel_values")


def test_length_grouped_sampler_splits_ranks_evenly_and_resumes():
    lengths = [i * 7 % 23 for i in range(41)]
    per_rank = [LengthGroupedSampler(lengths, 4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    b0, b1 = (list(s) for s in per_rank)
    assert len(b0) == len(b1)
    assert set(i for b in b0 + b1 for i in b) == set(range(41))
    s = per_rank[0]
    s.set_epoch(0, skip=2)
    assert list(s) == b0[2:] and len(s) == len(b0) - 2  # the batches left in the epoch
    s.set_epoch(1)
    assert list(s) != b0
