"""Synthetic demo dataset in the real formats (prepared JSONL, Arrow frames, DST TSV).

The task is built to be learnable by a tiny model from the pixels alone:

* every action is a (verb, part) pair; a frame shows the part's colour with the verb's texture
  while the action is in progress, a noisy grey "idle" frame otherwise, and an instantaneous action
  is a single flashed frame;
* the moment of every state change is visible in the frame where it happens, as coloured frame
  edges (the "contact" of a hand with a part): right white for any change, top yellow when a
  substep begins, bottom magenta when a substep is finished, left cyan when a step is finished,
  a black band across the middle when an action starts and ends in this very frame (without it
  the first frame of an instantaneous action looks like the first frame of a long one, and
  whether the action is ``in_progress`` or already ``completed`` could only be guessed)
  — so the model can learn *when* and *which kind* from one frame and *which node* from the
  frame's pattern and the tracked state;
* the assistant speaks when a substep starts (naming the substep and its first action), when a
  step is complete, and when the user asks what to do next — so speech is grounded in the tree;
* half the videos use the ``STEP 1.2.3`` TSV style and half ``step S1.2.a``; some parent
  timestamps are left empty (derived from the children).

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dst_train.data.dataset import SPLITS, assign_splits
from dst_train.data.proassist import encode_frame, write_frames

PARTS = {  # part -> RGB colour
    "wheel": (220, 40, 40),
    "axle": (240, 140, 20),
    "bumper": (230, 220, 30),
    "chassis": (40, 170, 60),
    "cabin": (30, 200, 210),
    "roof": (40, 70, 220),
    "door": (150, 60, 200),
    "light": (240, 110, 180),
    "tank": (235, 235, 235),
    "ladder": (120, 70, 30),
    "seat": (130, 140, 40),
    "mirror": (20, 120, 120),
}
VERBS = ("align", "insert", "screw", "press", "clip")  # each has its own texture
# event -> (side of the frame, colour): a frame can show several events, one side each
BORDERS = {
    "change": ("right", (255, 255, 255)),  # any state change in this frame
    "substep": ("top", (255, 255, 0)),  # a substep begins
    "substep_done": ("bottom", (255, 0, 255)),  # a substep is finished
    "step": ("left", (0, 255, 255)),  # a step is finished
    "instant": ("middle", (0, 0, 0)),  # an action starts and ends in this frame
}
VEHICLES = ("fire truck", "dump truck", "race car", "school bus", "tractor", "crane")
STEP_NAMES = ("build the chassis", "build the body", "add the details", "finish the top")
SYSTEM_PROMPT = (
    "You are a proactive assistant. Watch the user's actions, keep track of the task "
    "state and speak when it helps."
)


# the smallest frame side (pixels): every verb's texture (stripes of size // 8, at least one
# pixel) and the five event bands still apart from each other
MIN_IMAGE_SIZE = 8


@dataclass
class DemoSpec:
    """Sizes of a synthetic dataset. Frame counts are at ``fps`` frames per second."""

    videos: int = 24
    steps: tuple[int, int] = (2, 3)  # inclusive range per video
    substeps: tuple[int, int] = (2, 3)  # per step
    actions: tuple[int, int] = (1, 3)  # per substep
    action_frames: tuple[int, int] = (7, 14)  # duration of a non-instantaneous action
    gap_frames: tuple[int, int] = (0, 5)  # idle frames before an action
    instant_prob: float = 0.15  # chance that an action is instantaneous
    question_prob: float = 0.3  # chance per substep of a "what next?" user turn
    image_size: int = 64  # pixels (square); real Assembly101 frames are 384
    fps: float = 2.0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for each value no demo can be drawn with; empty = usable."""
        out = []
        if self.videos < 1:
            out.append(("videos", f"{self.videos}: need at least 1"))
        if self.image_size < MIN_IMAGE_SIZE:
            out.append(("image_size", f"{self.image_size}: need at least {MIN_IMAGE_SIZE} pixels"))
        return out


@dataclass
class _Action:
    id: str
    verb: str
    part: str
    start: float  # seconds
    end: float
    first_frame: int  # frames [first_frame, last_frame] show it
    last_frame: int


@dataclass
class _Video:
    uid: str
    vehicle: str
    style: str  # "numeric" | "letter"
    rows: list[tuple[str, str, float | None, float | None, str]] = field(default_factory=list)
    actions: list[_Action] = field(default_factory=list)
    conversation: list[dict] = field(default_factory=list)
    num_frames: int = 0
    events: dict[int, set[str]] = field(default_factory=dict)  # frame -> kinds (BORDERS keys)


def _node_id(style: str, path: list[int]) -> str:
    if style == "numeric":
        return ".".join(str(p) for p in path)
    head = f"S{path[0]}" + "".join(f".{p}" for p in path[1:2])
    return head + (f".{'abcdefghijklmnopqrstuvwxyz'[path[2] - 1]}" if len(path) == 3 else "")


def _type_name(style: str, level: str) -> str:
    return level.upper() if style == "numeric" else level


def make_video(rng: np.random.Generator, uid: str, style: str, spec: DemoSpec) -> _Video:
    """Draw one video's task tree, timeline and conversation."""
    fps = spec.fps
    video = _Video(uid, str(rng.choice(VEHICLES)), style)
    frame = int(rng.integers(3, 6))  # a few idle frames first (the user speaks in frame 1)
    user_frame = 1
    say: dict[int, list[str]] = {}  # assistant texts after frame
    asks: dict[int, str] = {}  # user texts after frame
    n_steps = int(rng.integers(spec.steps[0], spec.steps[1] + 1))
    parts = list(rng.permutation(list(PARTS)))
    end_jitter = 0.0  # where in its frame the previous action ended
    for s in range(1, n_steps + 1):
        step_id = _node_id(style, [s])
        step_name = STEP_NAMES[(s - 1) % len(STEP_NAMES)]
        step_row = len(video.rows)
        video.rows.append((_type_name(style, "step"), step_id, None, None, step_name))
        n_sub = int(rng.integers(spec.substeps[0], spec.substeps[1] + 1))
        for u in range(1, n_sub + 1):
            part = parts.pop() if parts else str(rng.choice(list(PARTS)))
            sub_id = _node_id(style, [s, u])
            sub_name = f"mount the {part}"
            sub_row = len(video.rows)
            video.rows.append((_type_name(style, "substep"), sub_id, None, None, sub_name))
            n_act = int(rng.integers(spec.actions[0], spec.actions[1] + 1))
            verbs = rng.choice(VERBS, size=n_act, replace=n_act > len(VERBS))
            sub_actions = []
            for a, verb in enumerate(verbs, 1):
                gap = int(rng.integers(spec.gap_frames[0], spec.gap_frames[1] + 1))
                if gap >= 2 and rng.random() < spec.question_prob and a == 1:
                    q = (
                        frame + gap // 2 - 1
                    )  # user asks while idle; assistant answers a frame later
                    asks[q] = "What should I do next?"
                    say.setdefault(q + 1, []).append(f"Next, {verb} the {part}.")
                frame += gap
                # Transitions land inside the frame; back-to-back actions share the boundary.
                jitter = float(rng.uniform(0.0, 0.4)) if gap else end_jitter
                if rng.random() < spec.instant_prob:
                    t = (frame + jitter) / fps
                    act = _Action(_node_id(style, [s, u, a]), str(verb), part, t, t, frame, frame)
                    frame += 1
                    end_jitter = 0.0
                else:
                    dur = int(rng.integers(spec.action_frames[0], spec.action_frames[1] + 1))
                    act = _Action(
                        _node_id(style, [s, u, a]),
                        str(verb),
                        part,
                        (frame + jitter) / fps,
                        (frame + dur + jitter) / fps,
                        frame,
                        frame + dur - 1,
                    )
                    frame += dur
                    end_jitter = jitter
                sub_actions.append(act)
                video.rows.append(
                    (
                        _type_name(style, "action"),
                        act.id,
                        round(act.start, 3),
                        round(act.end, 3),
                        f"{verb} the {part}",
                    )
                )
            video.actions.extend(sub_actions)
            for act in sub_actions:
                _mark(video, act.first_frame, "change")
                _mark(video, int(act.end * fps), "change")
                if act.start == act.end:
                    _mark(video, act.first_frame, "instant")
            first = sub_actions[0]
            _mark(video, first.first_frame, "substep")
            _mark(video, int(sub_actions[-1].end * fps), "substep_done")
            say.setdefault(first.first_frame, []).append(
                f"Now let's {sub_name}. Start to {first.verb} the {part}."
            )
            _set_parent_span(video, sub_row, sub_actions, rng)
        step_actions = [a for a in video.actions if a.id.startswith(step_id + ".")]
        _set_parent_span(video, step_row, step_actions, rng)
        done_frame = int(step_actions[-1].end * fps)
        _mark(video, done_frame, "step")
        msg = (
            f"Well done, you finished the {video.vehicle}!"
            if s == n_steps
            else f"Good, '{step_name}' is complete."
        )
        say.setdefault(done_frame, []).append(msg)
    video.num_frames = frame + int(rng.integers(3, 6))  # a few idle frames at the end
    video.rows = [(t, i, _round(a), _round(b), n) for t, i, a, b, n in video.rows]
    asks[user_frame] = f"I want to assemble the toy {video.vehicle}."
    say.setdefault(user_frame + 1, []).insert(0, "Sure, let's begin.")
    video.conversation = _conversation(video.num_frames, asks, say, fps)
    return video


def _mark(video: _Video, frame: int, kind: str) -> None:
    """Record a visible event at ``frame`` (every event also counts as a "change")."""
    video.events.setdefault(frame, set()).update({kind, "change"})


def _round(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def _set_parent_span(video: _Video, row: int, actions: list[_Action], rng) -> None:
    """Parents carry the hull of their actions, or (1 in 3) empty timestamps to be derived."""
    if rng.random() < 1 / 3:
        return
    t, i, _, _, n = video.rows[row]
    video.rows[row] = (t, i, min(a.start for a in actions), max(a.end for a in actions), n)


def _conversation(
    num_frames: int, asks: dict[int, str], say: dict[int, list[str]], fps: float
) -> list[dict]:
    """ProAssist-style turns: frames spans broken after every frame that has a text turn."""
    conv: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
    cut = sorted(f for f in set(asks) | set(say) if f < num_frames)
    a = 0
    for f in cut:
        conv.append({"role": "frames", "start": a, "end": f + 1})
        t = round((f + 0.5) / fps, 2)
        if f in asks:
            conv.append({"role": "user", "time": t, "content": asks[f], "labels": ""})
        for text in say.get(f, []):
            conv.append(
                {
                    "role": "assistant",
                    "time": t,
                    "content": text,
                    "labels": "initiative|instruction",
                    "progress": "",
                }
            )
        a = f + 1
    if a < num_frames:
        conv.append({"role": "frames", "start": a, "end": num_frames})
    return conv


# ------------------------------------------------------------------ frames
def _texture(verb: str, size: int) -> np.ndarray:
    """(size, size) boolean mask, one pattern per verb."""
    yy, xx = np.mgrid[0:size, 0:size]
    band = max(size // 8, 1)
    return {
        "align": (yy // band) % 2 == 0,
        "insert": (xx // band) % 2 == 0,
        "screw": ((xx + yy) // band) % 2 == 0,
        "press": ((xx // (2 * band)) + (yy // (2 * band))) % 2 == 0,
        "clip": (abs(xx - size / 2) < size / 4) & (abs(yy - size / 2) < size / 4),
    }[verb]


def render_frames(video: _Video, spec: DemoSpec, rng: np.random.Generator):
    """Yield base64 JPEG frames of ``video`` one at a time (never the whole video in memory)."""
    size = spec.image_size
    shown: dict[int, _Action] = {}
    for act in video.actions:
        for f in range(act.first_frame, act.last_frame + 1):
            shown[f] = act
    textures = {v: _texture(v, size) for v in VERBS}
    for f in range(video.num_frames):
        noise = rng.normal(0, 12, (size, size, 3))
        act = shown.get(f)
        if act is None:
            img = np.full((size, size, 3), 70.0) + noise
        else:
            img = np.empty((size, size, 3))
            img[:] = PARTS[act.part]
            img[textures[act.verb]] *= 0.35  # dark texture over the part colour
            img += noise
        b = max(size // 8, 1)
        sides = {
            "top": (slice(0, b), slice(None)),
            "bottom": (slice(-b, None), slice(None)),
            "left": (slice(None), slice(0, b)),
            "right": (slice(None), slice(-b, None)),
            "middle": (slice((size - b) // 2, (size + b) // 2), slice(None)),
        }
        for kind in sorted(video.events.get(f, ())):
            side, colour = BORDERS[kind]
            img[sides[side]] = colour
        yield encode_frame(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))


def _tsv(rows) -> str:
    lines = ["type\tid\tstart_ts\tend_ts\tname"]
    for t, i, a, b, n in rows:
        lines.append(f"{t}\t{i}\t{'' if a is None else a}\t{'' if b is None else b}\t{n}")
    return "\n".join(lines) + "\n"


def make_demo_data(out: str | Path, seed: int = 0, spec: DemoSpec | None = None) -> dict:
    """Write a whole demo dataset under ``out``; returns a small summary dict."""
    spec = spec or DemoSpec()
    problems = spec.problems()
    if problems:
        raise ValueError("; ".join(f"{name} {what}" for name, what in problems))
    out = Path(out)
    for sub in ("frames", "prepared", "dst"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uids = [f"demo_s{seed}_v{k:03d}" for k in range(spec.videos)]
    split_of = assign_splits(uids, spec.split_fractions, seed)
    records: dict[str, list[str]] = {s: [] for s in SPLITS}
    total_frames = 0
    for k, uid in enumerate(uids):
        video = make_video(rng, uid, "numeric" if k % 2 == 0 else "letter", spec)
        frames_file = f"frames/{uid}.arrow"
        total_frames += write_frames(out / frames_file, render_frames(video, spec, rng))
        (out / "dst" / f"{uid}.tsv").write_text(_tsv(video.rows), encoding="utf-8")
        record = {
            "dataset": "dst_demo",
            "video_uid": uid,
            "clip_idx": 0,
            "frames_file": frames_file,
            "max_seq_len": 0,
            "seq_len": 0,
            "num_tokens_per_img": 1,
            "use_img_sep_token": False,
            "start_frame_idx": 0,
            "end_frame_idx": video.num_frames,
            "conversation": video.conversation,
            "fps": spec.fps,
            "metadata": {"task_goal": f"Assemble a toy {video.vehicle}", "user_type": "demo"},
        }
        records[split_of[uid]].append(json.dumps(record))
    for split, lines in records.items():
        (out / "prepared" / f"{split}.jsonl").write_text(
            "".join(s + "\n" for s in lines), encoding="utf-8"
        )
    return {
        "root": str(out),
        "videos": spec.videos,
        "frames": total_frames,
        "splits": {s: len(v) for s, v in records.items()},
    }
