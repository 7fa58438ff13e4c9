"""Streaming inference over one video with a KV cache (the deployment loop).

Frame by frame: feed the frame's k tokens, read the speak and update probabilities at its last
token; above the update threshold, feed ``State: `` and decode the transition text *constrained*
to valid node ids and states, apply it, check the tree and repair it if needed; feed the user's
and later system turns of that frame (they are inputs, as in ProAssist's evaluation; turns said
before the first frame follow the first system prompt, as in training); above the speak threshold,
feed ``Assistant: `` and decode a response. When the cache nears ``max_context`` tokens the
context restarts from the system prompt + the current rendered state (context refresh).
The vision tower runs batched over a window of frames ahead of the LM, and several clips
stream at once, one per batch row (:class:`PaddedCache` keeps their contexts apart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from dst_train.data.dst_tree import STATES, DSTTree, check_state, parse_transitions, repair_state
from dst_train.data.labels import ClipLabels
from dst_train.data.sequence import SequenceBuilder
from dst_train.infer.padded_cache import PaddedCache


class ContextTooSmall(ValueError):
    """``max_context`` cannot hold a clip's system prompt and one frame."""


@dataclass
class FrameTrace:
    """What happened at one frame (one line of the trace JSONL)."""

    frame: int
    time: float  # seconds, start of the frame
    speak_prob: float
    update_prob: float
    response: str = ""  # "" = silent
    dst_text: str = ""  # "" = no update decoded
    dst_valid: bool | None = None  # before repair; None = no update
    repaired: bool = False
    state: dict[str, str] = field(default_factory=dict)  # tracked state after this frame
    refreshed: bool = False  # the context was restarted before this frame

    def to_dict(self) -> dict:
        return asdict(self)


class TransitionGrammar:
    """Prefix check for ``id=state; id=state`` over the ids of one tree (no id twice).

    Any state may be named, backwards too: a model whose tracked state went wrong can put it
    right (allowing forward changes only was measured to do worse on the demo). Hierarchical
    validity is not enforced here: it is checked (and counted) after decoding, then repaired.

    Tokens do not respect the grammar's pieces (a token may hold ``";"`` and the next one
    ``" 1.2"``), so checks work on the decoded text, character by character in effect."""

    SEP = "; "

    def __init__(self, node_ids: list[str]):
        self.items = {f"{i}={s}" for i in node_ids for s in STATES}
        self.alphabet = set(self.SEP).union(*self.items)
        self._candidates: torch.Tensor | None = None

    def candidates(self, token_text: list[str]) -> torch.Tensor:
        """Ids of the tokens made only of the grammar's characters (the only ones that can ever
        be allowed), computed once: each decoding step then checks tens of tokens, not the
        whole vocabulary."""
        if self._candidates is None:
            self._candidates = torch.tensor(
                [i for i, t in enumerate(token_text) if t and set(t) <= self.alphabet]
            )
        return self._candidates

    def _split(self, text: str) -> tuple[list[str], str] | None:
        """Complete items and the unfinished rest, or None if ``text`` cannot start a list."""
        done: list[str] = []
        rest = text
        while True:
            item = next((it for it in self.items if rest.startswith(it)), None)
            if item is None or not rest[len(item) :].startswith(self.SEP):
                break
            done.append(item)
            rest = rest[len(item) + len(self.SEP) :]
        ids = [d.split("=")[0] for d in done]
        return (done, rest) if len(set(ids)) == len(ids) else None

    def prefix_ok(self, text: str) -> bool:
        split = self._split(text)
        if split is None:
            return False
        done, rest = split
        used = {d.split("=")[0] for d in done}
        for item in self.items:
            if item.split("=")[0] in used:
                continue
            if item.startswith(rest) or (
                rest.startswith(item) and self.SEP.startswith(rest[len(item) :])
            ):
                return True
        return False

    def complete(self, text: str) -> bool:
        split = self._split(text)
        return (
            split is not None
            and split[1] in self.items
            and split[1].split("=")[0] not in {d.split("=")[0] for d in split[0]}
        )


@dataclass
class StreamJob:
    """One clip to stream: its labels, its task tree (None: speech only) and its frame loader,
    ``frames(list_of_frame_ids) -> dict`` of model inputs (``pixel_values`` or
    ``frame_features``)."""

    labels: ClipLabels
    tree: DSTTree | None
    frames: Callable[[list[int]], dict]


class _Row:
    """What one batch row knows about the clip it is streaming."""

    def __init__(self, index: int, job: StreamJob):
        clip = job.labels.clip
        self.index = index  # the job's place in the caller's list
        self.job = job
        self.tree = job.tree
        self.instruction = job.labels.instruction
        self.state = dict(job.labels.initial_state) if job.tree is not None else None
        self.grammar = TransitionGrammar(job.tree.order) if job.tree is not None else None
        # the turns the stream is given, by the frame they follow (None: before any frame), in
        # the training sequence's places (SequenceBuilder._units): user turns and the system
        # turns after the prompt (ProAssist's task knowledge) are inputs
        self.given: dict[int | None, list[tuple[str, str]]] = {}
        prompt = job.labels.prompt_index
        for i, seg in enumerate(job.labels.segments):
            if i != prompt and seg.kind in ("user", "system"):
                self.given.setdefault(seg.frame, []).append((seg.kind, seg.text))
        self.fps = clip.fps
        self.frame_ids = list(range(clip.start_frame_idx, clip.end_frame_idx))
        self.next = 0  # index in frame_ids of the frame to stream next
        self.window: torch.Tensor | None = None  # (W, k, H) embeddings of frames ahead
        self.window_start = 0
        self.traces: list[FrameTrace] = []
        self.started = False

    def done(self) -> bool:
        return self.next >= len(self.frame_ids)

    def frame_embeds(self, model, frame_batch: int, device: torch.device) -> torch.Tensor:
        """(k, H) embeddings of the next frame; the vision tower runs once per window."""
        i = self.next
        if self.window is None or i >= self.window_start + len(self.window):
            ids = self.frame_ids[i : i + frame_batch]
            inputs = {k: v.to(device) for k, v in self.job.frames(ids).items()}  # loaded on CPU
            self.window, self.window_start = model.frame_embeddings(**inputs), i
        return self.window[i - self.window_start]


class StreamingAssistant:
    """Streams clips through a :class:`DSTModel`, several at once (one per batch row).

    Rows run in lockstep, one frame per step; a row whose clip ends takes the next clip of the
    queue. Every row attends only to its own tokens (:class:`PaddedCache`), so a clip's trace does
    not depend on the batch it ran in (up to float rounding)."""

    def __init__(
        self,
        model,
        tokenizer,
        builder: SequenceBuilder,
        speak_threshold: float = 0.5,
        update_threshold: float = 0.5,
        max_context: int = 4096,
        max_new_tokens: int = 48,
        frame_batch: int = 64,
        device: torch.device | str = "cpu",
    ):
        self.model = model.eval()
        self.tok = tokenizer
        self.b = builder
        self.chat = model.backbone.chat
        self.speak_threshold = speak_threshold
        self.update_threshold = update_threshold
        self.max_context = max_context
        self.max_new_tokens = max_new_tokens
        self.frame_batch = frame_batch
        self.device = torch.device(device)
        self.end_id = tokenizer.convert_tokens_to_ids(self.chat.end)
        # a decoded turn at most: its prompt, max_new_tokens, the end token and the separator
        closing = self.max_new_tokens + 1 + len(builder.ids(self.chat.sep))
        self.dst_turn_max = len(builder.ids(self.chat.dst)) + closing
        self.reply_turn_max = len(builder.ids(self.chat.assistant)) + closing
        vocab = len(tokenizer)
        self.token_text = [tokenizer.decode([i]) for i in range(vocab)]

    # ------------------------------------------------------------------ run
    def run(self, labels: ClipLabels, tree: DSTTree | None, frames) -> list[FrameTrace]:
        """Stream one clip. ``frames`` loads pixels/features: ``frames(list_of_frame_ids)``."""
        return self.run_many([StreamJob(labels, tree, frames)], batch_size=1)[0]

    @torch.no_grad()
    def run_many(
        self,
        jobs: list[StreamJob],
        batch_size: int = 8,
        on_done: Callable[[int, list[FrameTrace]], None] | None = None,
    ) -> list[list[FrameTrace]]:
        """Stream every job, ``batch_size`` at a time; returns the traces in the jobs' order.
        ``on_done(job_index, traces)`` is called as each clip finishes."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        queue = list(enumerate(jobs))[::-1]
        results: list[list[FrameTrace]] = [[] for _ in jobs]
        slots: list[_Row | None] = [None] * min(batch_size, max(len(jobs), 1))
        cache = PaddedCache(self.model.backbone, len(slots), self.device)
        while True:
            for r, row in enumerate(slots):
                if row is not None and row.done():
                    results[row.index] = row.traces
                    if on_done is not None:
                        on_done(row.index, row.traces)
                    slots[r] = row = None
                if row is None and queue:
                    slots[r] = _Row(*queue.pop())
            live = {r: row for r, row in enumerate(slots) if row is not None}
            if not live:
                return results
            self._step(cache, live)

    # --------------------------------------------------------------- pieces
    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.backbone.embed_tokens(torch.tensor([ids], device=self.device))[0]

    def _given_ids(self, row: _Row, frame: int | None) -> list[int]:
        """The tokens of the turns ``row`` is given after ``frame`` (fed after its DST update;
        None: before the first frame, fed after the first system prompt)."""
        turns = row.given.get(frame, [])
        return [i for kind, text in turns for i in self.b.turn_ids(kind, text)[0]]

    def _frame_budget(self, row: _Row, given_tokens: int) -> int:
        """The most tokens the next frame of ``row`` can add: its k frame tokens, a decoded DST
        update, the frame's ``given_tokens`` and a decoded reply."""
        dst = self.dst_turn_max if row.grammar is not None else 0
        return self.model.backbone.tokens_per_frame + dst + given_tokens + self.reply_turn_max

    def _check_room(self, prompt_tokens: int, budget: int, row: _Row) -> None:
        """A fresh context must hold one frame's worst case: below that every frame would
        refresh, the model would see no history at all, and the context would still pass
        ``max_context``."""
        if prompt_tokens + budget > self.max_context:
            raise ContextTooSmall(
                f"max_context {self.max_context} is too small for clip "
                f"{row.job.labels.clip.video_uid}: its system prompt (instruction, task tree, "
                f"state; at the start, the turns before the first frame) takes {prompt_tokens} "
                f"tokens and frame {row.frame_ids[row.next]} may add {budget} (frame tokens, the "
                f"turns given after it, two decoded turns of up to max_new_tokens "
                f"= {self.max_new_tokens}); raise --max-context"
            )

    def _step(self, cache: PaddedCache, live: dict[int, _Row]) -> None:
        """One frame of every live row: refresh, frame, DST update, given turns, response.
        A row refreshes when its next frame's worst case would pass ``max_context``, so the
        context never does."""
        given = {r: self._given_ids(row, row.frame_ids[row.next]) for r, row in live.items()}
        budget = {r: self._frame_budget(row, len(given[r])) for r, row in live.items()}
        refresh = {
            r: row
            for r, row in live.items()
            if not row.started or cache.length(r) + budget[r] > self.max_context
        }
        if refresh:
            for r in refresh:
                cache.restart(r)
            cache.feed(
                {
                    r: self._embed(
                        self.b.system_ids(row.instruction, row.tree, row.state)
                        + ([] if row.started else self._given_ids(row, None))
                    )
                    for r, row in refresh.items()
                }
            )
            for r, row in refresh.items():
                self._check_room(cache.length(r), budget[r], row)
        hidden = cache.feed(
            {
                r: row.frame_embeds(self.model, self.frame_batch, self.device)
                for r, row in live.items()
            }
        )
        h = torch.stack([hidden[r] for r in live])
        speak = torch.sigmoid(self.model.speak_head(h)).flatten().tolist()
        update = torch.sigmoid(self.model.update_head(h)).flatten().tolist()
        traces = {}
        for (r, row), s, u in zip(live.items(), speak, update, strict=True):
            f = row.frame_ids[row.next]
            traces[r] = FrameTrace(f, f / row.fps, s, u, refreshed=r in refresh)
            row.started = True
        dst = [
            r
            for r, row in live.items()
            if row.grammar is not None and traces[r].update_prob > self.update_threshold
        ]
        if dst:
            prompt = self.b.ids(self.chat.dst)
            texts = self._decode(cache, {r: prompt for r in dst}, {r: live[r].grammar for r in dst})
            for r, text in texts.items():
                live[r].state = self._apply(live[r].tree, live[r].state, text, traces[r])
        given = {r: ids for r, ids in given.items() if ids}
        if given:
            cache.feed({r: self._embed(ids) for r, ids in given.items()})
        speakers = [r for r in live if traces[r].speak_prob > self.speak_threshold]
        if speakers:
            prompt = self.b.ids(self.chat.assistant)
            for r, text in self._decode(cache, {r: prompt for r in speakers}, {}).items():
                traces[r].response = text
        for r, row in live.items():
            if row.state is not None:
                traces[r].state = dict(row.state)
            row.traces.append(traces[r])
            row.next += 1

    def _decode(
        self,
        cache: PaddedCache,
        prompts: dict[int, list[int]],
        grammars: dict[int, TransitionGrammar],
    ) -> dict[int, str]:
        """Feed each row its prompt, then decode greedily until each row's end token (at most
        ``max_new_tokens``); rows with a grammar take only tokens it allows. The end token and
        separator close every row's turn. Only the decoding rows take part (a sub-cache)."""
        rows = list(prompts)
        sub = cache if len(rows) == cache.rows else cache.take(rows)
        local = {r: i for i, r in enumerate(rows)} if sub is not cache else {r: r for r in rows}
        texts = self._decode_rows(
            sub,
            {local[r]: ids for r, ids in prompts.items()},
            {local[r]: g for r, g in grammars.items()},
        )
        if sub is not cache:
            cache.put_back(sub, rows)
        return {r: texts[local[r]] for r in rows}

    def _decode_rows(
        self,
        cache: PaddedCache,
        prompts: dict[int, list[int]],
        grammars: dict[int, TransitionGrammar],
    ) -> dict[int, str]:
        hidden = cache.feed({r: self._embed(ids) for r, ids in prompts.items()})
        out: dict[int, list[int]] = {r: [] for r in prompts}
        text = {r: "" for r in prompts}
        active = list(prompts)
        head = self.model.backbone.lm_head
        for _ in range(self.max_new_tokens):
            logits = head(torch.stack([hidden[r] for r in active])).float()
            picks = {}
            for r, row_logits in zip(active, logits, strict=True):
                grammar = grammars.get(r)
                if grammar is None:
                    token = int(row_logits.argmax())
                else:
                    token = self._constrained_pick(row_logits, text[r], grammar)
                if token != self.end_id:
                    picks[r] = token
            if not picks:
                break
            for r, token in picks.items():
                out[r].append(token)
                text[r] += self.token_text[token]
            hidden = cache.feed({r: self._embed([t]) for r, t in picks.items()})
            active = list(picks)
        close = [self.end_id] + self.b.ids(self.chat.sep)
        cache.feed({r: self._embed(close) for r in prompts})
        return {r: self.tok.decode(ids).strip() for r, ids in out.items()}

    def _constrained_pick(self, logits, text: str, grammar: TransitionGrammar) -> int:
        """The most likely token that keeps ``text`` a valid prefix; the end token when the text
        is complete and the model ranks it above that token."""
        ids = grammar.candidates(self.token_text)
        best = None
        for idx in torch.argsort(logits[ids], descending=True).tolist():
            if grammar.prefix_ok(text + self.token_text[int(ids[idx])]):
                best = int(ids[idx])
                break
        if grammar.complete(text) and (best is None or logits[self.end_id] >= logits[best]):
            return self.end_id
        return self.end_id if best is None else best

    @staticmethod
    def _apply(tree: DSTTree, state: dict, text: str, trace: FrameTrace) -> dict:
        trace.dst_text = text
        try:
            changes = parse_transitions(text, tree)
        except ValueError:
            changes = {}
        new = {**state, **changes}
        problems = check_state(tree, new)
        trace.dst_valid = bool(changes) and not problems
        if problems:
            # keep what the model just said where possible; fix the rest of the tree around it
            pinned = {nid: len(tree.order) + 1.0 for nid in changes}
            new = repair_state(tree, new, pinned)
            trace.repaired = True
        return new
