"""Frame-level multi-task labels of one clip (DESIGN.md §3).

For every frame ``i`` of a clip (absolute index, 2 fps by default) this module decides

* ``speak[i]``  — an assistant turn follows frame ``i`` in the conversation;
* ``update[i]`` — some DST node changes state inside the frame's interval ``[i/fps, (i+1)/fps)``;

and keeps the response text (speak frames), the sparse transition text (update frames) and the DST
state at clip start. It also lays out the clip as an ordered list of :class:`Segment`\\ s — the
streaming order the model is trained on, with each DST update turn inserted right after its frame
and *before* any conversation turn that follows the same frame (the response is then grounded in
the new state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dst_train.data.dst_tree import DSTTree, render_transitions
from dst_train.data.proassist import ClipRecord


@dataclass(frozen=True)
class Segment:
    """One piece of the streamed clip.

    ``kind``: ``system`` | ``frames`` | ``user`` | ``assistant`` | ``dst``. ``frames`` segments
    cover ``[start, end)``; text segments carry ``text`` and, when they react to a frame, that
    frame's index in ``frame`` (None for turns before the first frame).
    """

    kind: str
    text: str = ""
    start: int = -1
    end: int = -1
    frame: int | None = None
    time: float | None = None  # seconds, for user/assistant turns


@dataclass
class ClipLabels:
    clip: ClipRecord
    speak: list[int]  # one per frame of the clip, index 0 = clip.start_frame_idx
    update: list[int] | None  # None when the video has no DST annotation
    responses: dict[int, list[str]] = field(default_factory=dict)  # frame -> assistant texts
    dst_updates: dict[int, str] = field(default_factory=dict)  # frame -> "1.2=completed; ..."
    initial_state: dict[str, str] | None = None
    segments: list[Segment] = field(default_factory=list)
    pre_frame_assistant_turns: int = 0  # assistant turns before any frame: no speak label

    @property
    def start(self) -> int:
        return self.clip.start_frame_idx

    @property
    def num_frames(self) -> int:
        return len(self.speak)

    @property
    def prompt_index(self) -> int | None:
        """Index in ``segments`` of the first system turn: the instruction, which opens every
        sequence (and every streamed context) as the prompt. Every later turn, system turns
        included, stays in the stream where it was said."""
        return next((i for i, s in enumerate(self.segments) if s.kind == "system"), None)

    @property
    def instruction(self) -> str:
        i = self.prompt_index
        return "" if i is None else self.segments[i].text


def build_clip_labels(clip: ClipRecord, tree: DSTTree | None = None) -> ClipLabels:
    """Labels and streaming layout of ``clip``; ``tree`` is its video's DST (or None)."""
    n, s0, fps = clip.num_frames, clip.start_frame_idx, clip.fps
    speak = [0] * n
    responses: dict[int, list[str]] = {}
    dst_updates: dict[int, str] = {}
    update = None
    initial = None
    if tree is not None:
        update = [0] * n
        initial = tree.state_before(s0 / fps)
        # One pass over the sorted transitions, bucketed by frame: O(frames + transitions).
        per_frame: dict[int, list] = {}
        t_lo, t_hi = s0 / fps, clip.end_frame_idx / fps
        for tr in tree.transitions():
            if t_lo <= tr.time < t_hi:
                per_frame.setdefault(int(tr.time * fps), []).append(tr)
        for f, trs in per_frame.items():
            f = min(max(f, s0), clip.end_frame_idx - 1)  # guard float rounding at the edges
            update[f - s0] = 1
            dst_updates[f] = render_transitions(tree.net_changes(trs))

    segments: list[Segment] = []
    last_frame: int | None = None
    pre_frame = 0
    for turn in clip.conversation:
        if turn.role == "frames":
            segments.extend(_frames_with_updates(turn.start, turn.end, dst_updates))
            last_frame = turn.end - 1
            continue
        segments.append(Segment(turn.role, turn.content, frame=last_frame, time=turn.time))
        if turn.role == "assistant":
            if last_frame is None:
                pre_frame += 1
            else:
                speak[last_frame - s0] = 1
                responses.setdefault(last_frame, []).append(turn.content)
    return ClipLabels(clip, speak, update, responses, dst_updates, initial, segments, pre_frame)


def _frames_with_updates(start: int, end: int, dst_updates: dict[int, str]) -> list[Segment]:
    """Split frames ``[start, end)`` after every update frame and insert the DST turn there."""
    out, a = [], start
    for f in range(start, end):
        if f in dst_updates:
            out.append(Segment("frames", start=a, end=f + 1))
            out.append(Segment("dst", dst_updates[f], frame=f))
            a = f + 1
    if a < end:
        out.append(Segment("frames", start=a, end=end))
    return out
