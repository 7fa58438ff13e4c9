"""Streaming inference with the tiny model: the KV-cache loop equals one full forward pass,
context refresh happens near the limit, and the tracked state is always a valid tree."""

import pytest
import torch

from dst_train.data.dataset import DatasetPaths, dst_path, load_split
from dst_train.data.dst_tree import check_state, load_dst_tsv
from dst_train.data.sequence import SequenceBuilder
from dst_train.infer.stream import ContextTooSmall, StreamingAssistant
from dst_train.model.backbone import load_image_processor, load_tokenizer
from dst_train.model.build import Precision, build_model
from dst_train.model.frames import FramePixels
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def setup(demo_root, tiny_model_dir):
    cfg = tiny_run_config(demo_root, tiny_model_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.head_config(), Precision("fp32", "sdpa")).eval()
    tok = load_tokenizer(cfg.model.arch)
    source = FramePixels(demo_root, load_image_processor(cfg.model.arch))
    labels = load_split(demo_root, "train", cfg.data.span_policy)[0]
    uid = labels.clip.video_uid
    tree = load_dst_tsv(dst_path(DatasetPaths.from_root(demo_root).dst_dir, uid))
    builder = SequenceBuilder(
        tok,
        model.backbone.chat,
        model.backbone.image_token_id,
        model.backbone.tokens_per_frame,
        4096,
    )

    def frames(ids):
        return {"pixel_values": source.load(labels.clip.frames_file, ids)}

    return model, tok, builder, labels, tree, frames


def _assistant(setup, **kw):
    model, tok, builder, *_ = setup
    return StreamingAssistant(model, tok, builder, frame_batch=7, **kw)


def _varied_heads(model):
    """A copy whose decision heads vary per frame (untrained heads give every frame the same
    probability, whatever the model saw — a comparison of those proves nothing)."""
    import copy

    model = copy.deepcopy(model)
    torch.manual_seed(1)
    for head in (model.speak_head, model.update_head):
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    return model


def test_cached_streaming_equals_one_full_forward(setup):
    model, tok, builder, labels, tree, frames = setup
    model = _varied_heads(model)
    silent = StreamingAssistant(
        model, tok, builder, frame_batch=7, speak_threshold=2.0, update_threshold=2.0
    )
    traces = silent.run(labels, tree, frames)
    n = labels.clip.end_frame_idx - labels.clip.start_frame_idx
    assert [t.frame for t in traces] == list(
        range(labels.clip.start_frame_idx, labels.clip.end_frame_idx)
    )
    assert not any(t.response or t.dst_text for t in traces)
    # the same sequence in one pass: system prompt, then each frame and the user turns after it
    instruction = next(t.content for t in labels.clip.conversation if t.role == "system")
    users = {}
    for seg in labels.segments:
        if seg.kind == "user" and seg.frame is not None:
            users.setdefault(seg.frame, []).append(seg.text)

    def full_forward(frame_ids):
        with torch.no_grad():
            emb = model.frame_embeddings(**frames(frame_ids))
            parts, last = (
                [
                    model.backbone.embed_tokens(
                        torch.tensor([builder.system_ids(instruction, tree, labels.initial_state)])
                    )[0]
                ],
                [],
            )
            for i, t in enumerate(traces):
                parts.append(emb[i])
                last.append(sum(len(p) for p in parts) - 1)
                for text in users.get(t.frame, []):
                    ids, _, _ = builder.turn_ids("user", text)
                    parts.append(model.backbone.embed_tokens(torch.tensor([ids]))[0])
            hidden, _ = model.backbone.decode(torch.cat(parts)[None])
            h = hidden[0, last]
            assert len(last) == n
            return [
                torch.sigmoid(head(h)).squeeze(-1) for head in (model.speak_head, model.update_head)
            ]

    streamed = [
        torch.tensor([t.speak_prob for t in traces]),
        torch.tensor([t.update_prob for t in traces]),
    ]
    assert min(p.std() for p in streamed) > 1e-3  # the heads tell frames apart
    assert users  # the clip has a user turn: where it goes is checked too
    # fp32 noise here is ~3e-7; a user turn fed one frame late moves the probabilities ~2e-5
    for full, got in zip(full_forward([t.frame for t in traces]), streamed, strict=True):
        assert torch.allclose(full, got, rtol=0, atol=2e-6)
    # ... and the comparison sees which frame went where: reversed frames give other numbers
    swapped = full_forward([t.frame for t in traces][::-1])
    assert not torch.allclose(swapped[0], streamed[0], atol=1e-4)


def test_streaming_feeds_the_given_turns_where_training_puts_them(setup):
    """The turns the stream is given (user turns and ProAssist's later system turns, such as the
    task knowledge after the first user turn; turns said before the first frame) are where the
    training sequence has them: a silent stream's probabilities equal one forward pass of the
    training sequence of the clip without its assistant and DST turns."""
    import dataclasses

    from dst_train.data.labels import Segment

    model, tok, builder, labels, tree, frames = setup
    model = _varied_heads(model)
    segments = [s for s in labels.segments if s.kind not in ("assistant", "dst")]
    first_user = next(i for i, s in enumerate(segments) if s.kind == "user" and s.frame)
    said = segments[first_user].frame
    segments.insert(first_user + 1, Segment("system", "Task knowledge: wheels first", frame=said))
    segments.insert(1, Segment("user", "Hello, I am ready to start.", frame=None))
    assert segments[0].kind == "system" and segments[2].kind == "frames"
    given = dataclasses.replace(labels, segments=segments, dst_updates={})
    silent = StreamingAssistant(
        model, tok, builder, frame_batch=7, speak_threshold=2.0, update_threshold=2.0
    )
    traces = silent.run(given, tree, frames)
    (sample,) = builder.build(given, tree)
    assert sample.frames == [t.frame for t in traces]
    with torch.no_grad():
        ids = torch.tensor([sample.input_ids])
        embeds = model.embed(ids, model.frame_embeddings(**frames(sample.frames)))
        hidden, _ = model.backbone.decode(embeds, torch.ones_like(ids))
        h = hidden[0, sample.decision_pos]
        for head, key in ((model.speak_head, "speak_prob"), (model.update_head, "update_prob")):
            got = torch.tensor([getattr(t, key) for t in traces])
            assert torch.allclose(torch.sigmoid(head(h)), got, rtol=0, atol=2e-6), key


def test_forced_decoding_refreshes_the_context_and_keeps_a_valid_state(setup, monkeypatch):
    from dst_train.infer.padded_cache import PaddedCache

    lengths = []  # every row's context length after each feed, decoding included
    feed = PaddedCache.feed

    def watched(cache, items):
        out = feed(cache, items)
        lengths.extend(cache.length(r) for r in items)
        return out

    monkeypatch.setattr(PaddedCache, "feed", watched)
    *_, labels, tree, frames = setup
    assistant = _assistant(
        setup, speak_threshold=-1.0, update_threshold=-1.0, max_context=300, max_new_tokens=8
    )
    traces = assistant.run(labels, tree, frames)
    assert traces[0].refreshed and sum(t.refreshed for t in traces) >= 2
    assert 250 < max(lengths) <= 300  # refreshed before max_context, not long before
    # a context that cannot hold the system prompt (~220 tokens here) and one frame
    with pytest.raises(ContextTooSmall, match=r"max_context 200 is too small for clip \S+: "):
        _assistant(setup, max_context=200, max_new_tokens=8).run(labels, tree, frames)
    assert all(t.dst_valid is not None for t in traces)  # an update decoded at every frame
    for t in traces:
        assert check_state(tree, t.state) == [], t
        assert set(t.state) == set(tree.order)
    assert any(t.repaired for t in traces) or all(t.dst_valid for t in traces)


def test_a_refresh_starts_from_the_state_reached_and_decoded_turns_end_as_in_training(
    setup, monkeypatch
):
    from dst_train.data.labels import Segment

    model, tok, builder, labels, tree, frames = setup
    fed, prompted, built = [], [], []  # every token list fed; each system prompt's state, ids
    embed, system_ids = StreamingAssistant._embed, builder.system_ids

    def record_embed(self, ids):
        fed.append(list(ids))
        return embed(self, ids)

    def record_system(instruction, tree, state):
        prompted.append(dict(state))
        built.append(system_ids(instruction, tree, state))
        return built[-1]

    monkeypatch.setattr(StreamingAssistant, "_embed", record_embed)
    monkeypatch.setattr(builder, "system_ids", record_system)
    assistant = _assistant(
        setup, speak_threshold=-1.0, update_threshold=-1.0, max_context=300, max_new_tokens=8
    )
    short = _first_frames(labels, 24)
    hello = Segment("user", "Hello.", frame=None)  # said before the first frame
    short.segments = [short.segments[0], hello, *short.segments[1:]]
    traces = assistant.run(short, tree, frames)
    refreshes = [i for i, t in enumerate(traces) if t.refreshed]
    assert len(refreshes) == len(prompted) >= 3 and refreshes[0] == 0
    # the turns before the first frame follow the first prompt only (as in training)
    assert fed[0] == built[0] + builder.turn_ids("user", "Hello.")[0]
    assert all(prompt in fed for prompt in built[1:])
    assert prompted[0] == labels.initial_state
    assert [traces[i - 1].state for i in refreshes[1:]] == prompted[1:]
    assert any(p != labels.initial_state for p in prompted[1:])  # the state had moved on
    # a decoded turn: its role prompt, one token at a time, then the end token and separator
    chat = model.backbone.chat
    prompts = [builder.ids(chat.dst), builder.ids(chat.assistant)]
    closing = [assistant.end_id] + builder.ids(chat.sep)
    turns = 0
    for i, ids in enumerate(fed):
        if ids in prompts:
            j = i + 1
            while len(fed[j]) == 1 and fed[j] != closing:
                j += 1
            assert j - i - 1 <= 8 and fed[j] == closing, fed[i : j + 1]
            turns += 1
    assert turns == 2 * len(traces)  # an update and a reply at every frame


def test_each_head_fires_by_its_own_threshold(setup):
    *_, labels, tree, frames = setup
    short = _first_frames(labels, 6)
    only_dst = _assistant(setup, speak_threshold=2.0, update_threshold=-1.0, max_new_tokens=2)
    traces = only_dst.run(short, tree, frames)
    assert all(t.dst_valid is not None and not t.response for t in traces)
    only_speech = _assistant(setup, speak_threshold=-1.0, update_threshold=2.0, max_new_tokens=2)
    traces = only_speech.run(short, tree, frames)
    assert all(t.dst_valid is None and t.dst_text == "" for t in traces)
    assert any(t.response for t in traces)


def _first_frames(labels, n):
    """``labels`` cut to the clip's first ``n`` frames (a short clip: fast to stream)."""
    import copy

    short = copy.copy(labels)
    short.clip = copy.copy(labels.clip)
    short.clip.end_frame_idx = labels.clip.start_frame_idx + n
    return short


def test_without_a_tree_only_speech_is_decoded(setup):
    *_, labels, _tree, frames = setup
    traces = _assistant(setup, speak_threshold=-1.0, update_threshold=-1.0, max_new_tokens=4).run(
        labels, None, frames
    )
    assert all(t.dst_valid is None and t.state == {} for t in traces)
    assert any(t.response for t in traces)  # speech is still decoded (seeded random model)


def _jobs(demo_root, model_dir, n):
    """StreamJobs for the first ``n`` clips of the demo (every split), each with its tree."""
    from dst_train.infer.stream import StreamJob

    dst_dir = DatasetPaths.from_root(demo_root).dst_dir
    source = FramePixels(demo_root, load_image_processor(str(model_dir)))
    jobs = []
    for split in ("train", "val", "test"):
        for labels in load_split(demo_root, split):
            tree = load_dst_tsv(dst_path(dst_dir, labels.clip.video_uid))

            def frames(ids, _file=labels.clip.frames_file):
                return {"pixel_values": source.load(_file, ids)}

            jobs.append(StreamJob(labels, tree, frames))
    return sorted(jobs, key=lambda j: j.labels.clip.end_frame_idx)[:n]  # the shortest: fast


def test_a_batch_of_clips_streams_as_each_clip_alone(setup, demo_root, tiny_model_dir):
    """3 clips through 2 rows (the freed row takes the third clip), a context small enough to
    refresh and compact the cache, some rows decoding while others wait: every trace equals
    the clip streamed alone."""
    model, tok, builder, *_ = setup
    setup = (_varied_heads(model), tok, builder)
    jobs = _jobs(demo_root, tiny_model_dir, 3)
    silent = _assistant(setup, speak_threshold=2.0, update_threshold=2.0)
    probs = silent.run_many(jobs, batch_size=3)
    speak = sorted(t.speak_prob for traces in probs for t in traces)
    update = sorted(t.update_prob for traces in probs for t in traces)
    thresholds = {
        "speak_threshold": speak[int(0.85 * len(speak))],  # ~15 % of frames speak,
        "update_threshold": update[int(0.8 * len(update))],  # ~20 % update
    }
    assistant = _assistant(
        setup,
        **thresholds,
        max_context=430,
        max_new_tokens=4,
    )
    done = []
    batched = assistant.run_many(jobs, batch_size=2, on_done=lambda i, t: done.append(i))
    assert sorted(done) == [0, 1, 2]
    spoke = updated = refreshed = 0
    for job, traces in zip(jobs, batched, strict=True):
        alone = assistant.run(job.labels, job.tree, job.frames)
        assert [t.frame for t in traces] == [t.frame for t in alone]
        for a, b in zip(traces, alone, strict=True):
            assert abs(a.speak_prob - b.speak_prob) < 1e-4
            assert abs(a.update_prob - b.update_prob) < 1e-4
            assert (a.response, a.dst_text, a.state, a.refreshed) == (
                b.response,
                b.dst_text,
                b.state,
                b.refreshed,
            )
        spoke += sum(t.speak_prob > thresholds["speak_threshold"] for t in traces)
        updated += sum(bool(t.dst_text) for t in traces)
        refreshed += sum(t.refreshed for t in traces)
    assert spoke > 3 and updated > 3 and refreshed > 6  # decoding and refresh were exercised


def test_batch_size_must_be_positive(setup, demo_root, tiny_model_dir):
    with pytest.raises(ValueError, match="batch_size"):
        _assistant(setup).run_many(_jobs(demo_root, tiny_model_dir, 1), batch_size=0)


def test_a_probability_equal_to_the_threshold_does_not_fire_and_times_are_seconds(setup):
    """Heads at logit 0 give every frame probability exactly 0.5: at threshold 0.5 nothing fires
    (``p > t``, the rule the validation sweep chose the threshold by), just below it all do.
    Each trace's time is its frame's start in seconds."""
    import copy

    model, tok, builder, labels, tree, frames = setup
    half = copy.deepcopy(model)
    for head in (half.speak_head, half.update_head):
        torch.nn.init.zeros_(head.net[-1].weight)
        torch.nn.init.zeros_(head.net[-1].bias)
    labels = copy.copy(labels)

    def run(t):
        assistant = StreamingAssistant(half, tok, builder, frame_batch=7, speak_threshold=t,
                                       update_threshold=t, max_new_tokens=2)  # fmt: skip
        return assistant.run(labels, tree, frames)

    at = run(0.5)
    assert {(t.speak_prob, t.update_prob) for t in at} == {(0.5, 0.5)}
    assert not any(t.response or t.dst_text for t in at)
    below = run(0.4999)
    assert all(t.response or t.dst_text for t in below[:3])
    fps = labels.clip.fps
    assert [t.time for t in at] == [t.frame / fps for t in at] and at[-1].frame > fps


@pytest.mark.parametrize("with_tree", [False, True])
def test_a_frame_adds_at_most_its_budget_and_a_reply_that_runs_to_the_limit_adds_all(
    setup, monkeypatch, with_tree
):
    """The refresh rule trusts ``_frame_budget``: the most tokens one frame can add. A frame's
    growth must never pass it, and a reply decoded to ``max_new_tokens`` (its end token and
    separator then closing it) must reach it exactly when no DST turn is possible."""
    from dst_train.infer.stream import StreamingAssistant

    grown = []  # (tokens the frame added, its budget), frames that did not refresh
    step = StreamingAssistant._step

    def watched(self, cache, live):
        before = {r: (cache.length(r), _budget(self, row)) for r, row in live.items()}
        step(self, cache, live)
        for r, row in live.items():
            if not row.traces[-1].refreshed:
                grown.append((cache.length(r) - before[r][0], before[r][1]))

    monkeypatch.setattr(StreamingAssistant, "_step", watched)
    *_, labels, tree, frames = setup
    assistant = _assistant(setup, speak_threshold=-1.0, update_threshold=-1.0, max_new_tokens=2)
    assistant.run(labels, tree if with_tree else None, frames)
    assert len(grown) > 10 and all(g <= budget for g, budget in grown), grown
    if not with_tree:  # the seeded random model runs some replies to the limit
        assert any(g == budget for g, budget in grown), grown


def _budget(assistant, row) -> int:
    """The budget of ``row``'s next frame, with the turns it is given after that frame."""
    return assistant._frame_budget(row, len(assistant._given_ids(row, row.frame_ids[row.next])))


def _frames_seen(monkeypatch) -> list:
    """Per streamed frame that did not refresh: (context length before it, its budget, tokens
    it added)."""
    from dst_train.infer.stream import StreamingAssistant

    seen = []
    step = StreamingAssistant._step

    def watched(self, cache, live):
        (r, row), = live.items()  # fmt: skip
        before = cache.length(r), _budget(self, row)
        step(self, cache, live)
        if not row.traces[-1].refreshed:
            seen.append((*before, cache.length(r) - before[0]))

    monkeypatch.setattr(StreamingAssistant, "_step", watched)
    return seen


def test_the_context_may_fill_to_exactly_max_context(setup, monkeypatch):
    """A frame whose worst case would end exactly at ``max_context`` runs without a refresh:
    the limit is the most the context holds, not one more than it."""
    *_, labels, _tree, frames = setup
    seen = _frames_seen(monkeypatch)
    _assistant(setup, speak_threshold=-1.0, max_new_tokens=2).run(labels, None, frames)
    # a frame that used its whole budget, every earlier frame's worst case ending before its
    ends = [length + budget for length, budget, _ in seen]
    f = next(
        i
        for i, (length, budget, added) in enumerate(seen)
        if added == budget and all(e < ends[i] for e in ends[:i])
    )
    limit = ends[f]
    seen.clear()
    traces = _assistant(setup, speak_threshold=-1.0, max_new_tokens=2, max_context=limit).run(
        labels, None, frames
    )
    assert not traces[f + 1].refreshed  # seen[f] is the frame after the first one
    assert seen[f][0] + seen[f][2] == limit  # filled to the limit exactly
    assert max(length + added for length, _, added in seen) == limit
