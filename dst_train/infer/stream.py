"""Streaming inference over one video with a KV cache (the deployment loop).

Frame by frame: feed the frame's k tokens, read the speak and update probabilities at its last
token; above the update threshold, feed ``State: `` and decode the transition text *constrained*
to valid node ids and states, apply it, check the tree and repair it if needed; feed the user's
turns of that frame (they are inputs, as in ProAssist's evaluation); above the speak threshold,
feed ``Assistant: `` and decode a response. When the cache nears ``max_context`` tokens the
context restarts from the system prompt + the current rendered state (context refresh).
The vision tower runs batched over a window of frames ahead of the LM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from dst_train.data.dst_tree import STATES, DSTTree, check_state, parse_transitions, repair_state
from dst_train.data.labels import ClipLabels
from dst_train.data.sequence import SequenceBuilder


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


class StreamingAssistant:
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
        vocab = len(tokenizer)
        self.token_text = [tokenizer.decode([i]) for i in range(vocab)]

    # --------------------------------------------------------------- pieces
    def _feed_ids(self, ids: list[int], cache):
        x = torch.tensor([ids], device=self.device)
        return self._feed_embeds(self.model.backbone.embed_tokens(x), cache)

    def _feed_embeds(self, embeds, cache):
        hidden, cache = self.model.backbone.decode(embeds, past_key_values=cache, use_cache=True)
        return hidden[:, -1], cache

    def _decode(self, cache, last_hidden, grammar: TransitionGrammar | None):
        """Greedy decoding until the end token; with a grammar only allowed tokens are taken."""
        out: list[int] = []
        text = ""
        head = self.model.backbone.lm_head
        for _ in range(self.max_new_tokens):
            logits = head(last_hidden)[0].float()
            if grammar is None:
                token = int(logits.argmax())
            else:
                token = self._constrained_pick(logits, text, grammar)
            if token == self.end_id:
                break
            out.append(token)
            text += self.token_text[token]
            last_hidden, cache = self._feed_ids([token], cache)
        last_hidden, cache = self._feed_ids([self.end_id] + self.b.ids(self.chat.sep), cache)
        return self.tok.decode(out).strip(), last_hidden, cache

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

    # ------------------------------------------------------------------ run
    @torch.no_grad()
    def run(self, labels: ClipLabels, tree: DSTTree | None, frames) -> list[FrameTrace]:
        """Stream one clip. ``frames`` loads pixels/features: ``frames(list_of_frame_ids)``."""
        clip = labels.clip
        instruction = next((t.content for t in clip.conversation if t.role == "system"), "")
        state = dict(labels.initial_state) if tree is not None else None
        grammar = TransitionGrammar(tree.order) if tree is not None else None
        user_turns: dict[int, list[str]] = {}
        for seg in labels.segments:
            if seg.kind == "user" and seg.frame is not None:
                user_turns.setdefault(seg.frame, []).append(seg.text)
        cache, refreshed = None, True
        traces: list[FrameTrace] = []
        frame_ids = list(range(clip.start_frame_idx, clip.end_frame_idx))
        k = self.model.backbone.tokens_per_frame
        for w in range(0, len(frame_ids), self.frame_batch):
            window = frame_ids[w : w + self.frame_batch]
            embeds = self.model.frame_embeddings(**frames(window))  # (W, k, H)
            for j, f in enumerate(window):
                budget = k + 2 * self.max_new_tokens + 16  # this frame's worst case
                if cache is None or cache.get_seq_length() + budget > self.max_context:
                    sys_ids = self.b.system_ids(instruction, tree, state)
                    _, cache = self._feed_ids(sys_ids, None)
                    refreshed = True
                hidden, cache = self._feed_embeds(embeds[j : j + 1].to(self.device), cache)
                trace = FrameTrace(
                    f,
                    f / clip.fps,
                    torch.sigmoid(self.model.speak_head(hidden)).item(),
                    torch.sigmoid(self.model.update_head(hidden)).item(),
                    refreshed=refreshed,
                )
                refreshed = False
                if grammar is not None and trace.update_prob > self.update_threshold:
                    hidden, cache = self._feed_ids(self.b.ids(self.chat.dst), cache)
                    text, hidden, cache = self._decode(cache, hidden, grammar)
                    state = self._apply(tree, state, text, trace)
                for user_text in user_turns.get(f, []):
                    ids, _, _ = self.b.turn_ids("user", user_text)
                    hidden, cache = self._feed_ids(ids, cache)
                if trace.speak_prob > self.speak_threshold:
                    hidden, cache = self._feed_ids(self.b.ids(self.chat.assistant), cache)
                    trace.response, hidden, cache = self._decode(cache, hidden, None)
                if state is not None:
                    trace.state = dict(state)
                traces.append(trace)
        return traces

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
