"""Clip → token sequence(s) with the labels of the four outputs (DESIGN.md §3).

Layout of one sample (``<image>`` × k per frame, chat strings from the backbone's ChatFormat)::

    <|im_start|>System: {instruction}
    Task state:
    {full DST state}<end_of_utterance>\\n
    <image>..<image>  <image>..<image>  State: 1.2=completed<end_of_utterance>\\n  <image>..
    Assistant: Now let's ...<end_of_utterance>\\n  <image>.. User: ...<end_of_utterance>\\n ...

* decision position of a frame = its last image token; ``speak``/``update`` labels live there;
* LM targets: the content and end token of every assistant turn (kind 1, response) and DST turn
  (kind 2), never their role prefix (at inference the prefix is fed when a head fires);
* a clip longer than ``max_seq_len`` is split at a frame/turn boundary — never inside a turn —
  and every continuation starts with the system prompt and the DST state reached so far (the same
  context refresh inference does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dst_train.data.dst_tree import DSTTree, parse_transitions
from dst_train.data.labels import ClipLabels
from dst_train.model.backbone import ChatFormat

RESPONSE, DST = 1, 2
IGNORE = -100


class SequenceTooLong(ValueError):
    """A clip's system prompt, or one frame with its turns, does not fit ``max_seq_len``."""


@dataclass
class Sample:
    """One training sequence. Positions index ``input_ids``."""

    input_ids: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # absolute frame index of each frame, in order
    decision_pos: list[int] = field(default_factory=list)  # last token of each frame
    speak: list[int] = field(default_factory=list)  # per frame
    update: list[int] = field(default_factory=list)  # per frame; -1 = no DST annotation
    targets: list[int] = field(default_factory=list)  # per position: next token to predict or -100
    target_kind: list[int] = field(default_factory=list)  # per position: 0, RESPONSE or DST
    frames_file: str = ""
    video_uid: str = ""
    source: str = ""  # "prepared.jsonl:line#chunk"

    def __len__(self) -> int:
        return len(self.input_ids)


class SequenceBuilder:
    """Renders :class:`ClipLabels` into :class:`Sample` s for one tokenizer and backbone."""

    def __init__(
        self,
        tokenizer,
        chat: ChatFormat,
        image_token_id: int,
        tokens_per_frame: int,
        max_seq_len: int = 4096,
    ):
        self.tok = tokenizer
        self.chat = chat
        self.image_token_id = image_token_id
        self.k = tokens_per_frame
        self.max_seq_len = max_seq_len
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    # ------------------------------------------------------------ pieces
    def system_ids(self, instruction: str, tree: DSTTree | None, state: dict | None) -> list[int]:
        text = instruction
        if tree is not None and state is not None:
            text += "\nTask state:\n" + tree.render_state(state)
        c = self.chat
        return self.ids(c.bos) + self.ids(c.system) + self.ids(text) + self.ids(c.end + c.sep)

    def turn_ids(self, kind: str, text: str) -> tuple[list[int], int, int]:
        """Token ids of one text turn, the length of its unlabelled role prefix, and the length
        of its body (content + end token: what carries LM targets)."""
        c = self.chat
        prefix = self.ids(
            {"user": c.user, "assistant": c.assistant, "dst": c.dst, "system": c.system}[kind]
        )
        body = self.ids(text) + self.ids(c.end)
        return prefix + body + self.ids(c.sep), len(prefix), len(body)

    # ------------------------------------------------------------- build
    def build(self, labels: ClipLabels, tree: DSTTree | None) -> list[Sample]:
        clip = labels.clip
        instruction = labels.instruction
        state = dict(labels.initial_state) if labels.initial_state is not None else None
        samples: list[Sample] = []
        cur = self._start(labels, instruction, tree, state, 0)
        for frame, turns in self._units(labels):
            size = (self.k if frame is not None else 0) + sum(len(t[1]) for t in turns)
            if len(cur) + size > self.max_seq_len and cur.frames:
                samples.append(cur)
                cur = self._start(labels, instruction, tree, state, len(samples))
            if len(cur) + size > self.max_seq_len:
                raise SequenceTooLong(
                    f"{clip.source}: frame {frame} and the turns after it need {size} "
                    f"tokens, which does not fit max_seq_len={self.max_seq_len} "
                    "after the system prompt; raise data.max_seq_len (evaluate: --max-context)"
                )
            if frame is not None:
                self._add_frame(cur, labels, frame)
            for seg, ids, n_prefix, n_body in turns:
                self._add_text(
                    cur, ids, n_prefix, n_body, {"assistant": RESPONSE, "dst": DST}.get(seg.kind, 0)
                )
                if seg.kind == "dst" and state is not None:
                    state.update(parse_transitions(seg.text))
        samples.append(cur)
        return [s for s in samples if s.frames]  # a chunk without frames has no decisions

    def _units(self, labels: ClipLabels):
        """Atomic pieces that are never split: a frame with the turns that react to it (its DST
        update, the reply, a user turn), or turns before the first frame (frame None)."""
        frame, turns = None, []
        prompt = labels.prompt_index  # the instruction: already in place
        for i, seg in enumerate(labels.segments):
            if i == prompt:
                continue
            if seg.kind == "frames":
                for f in range(seg.start, seg.end):
                    if frame is not None or turns:
                        yield frame, turns
                    frame, turns = f, []
                continue
            turns.append((seg, *self.turn_ids(seg.kind, seg.text)))
        if frame is not None or turns:
            yield frame, turns

    def _start(self, labels, instruction, tree, state, index) -> Sample:
        ids = self.system_ids(instruction, tree, state)
        if len(ids) + self.k > self.max_seq_len:
            raise SequenceTooLong(
                f"{labels.clip.source}: the system prompt alone is {len(ids)} tokens, "
                f"over max_seq_len={self.max_seq_len}; raise data.max_seq_len (evaluate: "
                "--max-context)"
            )
        clip = labels.clip
        return Sample(
            input_ids=list(ids),
            targets=[IGNORE] * len(ids),
            target_kind=[0] * len(ids),
            frames_file=clip.frames_file,
            video_uid=clip.video_uid,
            source=f"{clip.source}#{index}",
        )

    def _add_frame(self, s: Sample, labels: ClipLabels, frame: int) -> None:
        s.input_ids += [self.image_token_id] * self.k
        s.targets += [IGNORE] * self.k
        s.target_kind += [0] * self.k
        s.frames.append(frame)
        s.decision_pos.append(len(s.input_ids) - 1)
        i = frame - labels.start
        s.speak.append(labels.speak[i])
        s.update.append(labels.update[i] if labels.update is not None else -1)

    @staticmethod
    def _add_text(s: Sample, ids: list[int], n_prefix: int, n_body: int, kind: int) -> None:
        start = len(s.input_ids)
        s.input_ids += ids
        s.targets += [IGNORE] * len(ids)
        s.target_kind += [0] * len(ids)
        if kind:
            # position p-1 predicts token p: label the body (content + end), not prefix or sep
            first = start + n_prefix
            for p in range(first, first + n_body):
                s.targets[p - 1] = s.input_ids[p]
                s.target_kind[p - 1] = kind
