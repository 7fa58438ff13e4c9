"""Evaluation outputs: ``report.json``, ``report.md`` (the table) and plots."""

from __future__ import annotations

import json
from pathlib import Path

from dst_train.atomic_io import write_text_atomic
from dst_train.data.dst_tree import COMPLETED

# the flat keys every report.json "metrics" object has (the contract)
REPORT_KEYS = (
    "speak_f1",
    "speak_precision",
    "speak_recall",
    "jaccard",
    "missing_rate",
    "redundant_rate",
    "bleu4",
    "meteor",
    "cider",
    "semantic_similarity",
    "dst_state_accuracy",
    "dst_joint_accuracy",
    "update_f1",
    "transition_accuracy",
    "valid_dst_ratio",
)
# the printed table: those plus the extras that explain them
ROWS = REPORT_KEYS + ("rouge_l", "update_precision", "update_recall")


def table(report: dict) -> str:
    cols = [("trained", report.get("metrics", {}))]
    n = report.get("baseline_clips")
    if "metrics_on_baseline_clips" in report:
        cols.append((f"trained, first {n} clips", report["metrics_on_baseline_clips"]))
    if "baseline_metrics" in report:
        label = "untrained baseline" + (f", first {n} clips" if len(cols) > 1 else "")
        cols.append((label, report["baseline_metrics"]))
    head = "| metric | " + " | ".join(name for name, _ in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for key in ROWS:
        vals = [m.get(key) for _, m in cols]
        lines.append(
            f"| {key} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |"
        )
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    videos = report.get("_videos", [])
    body = {k: v for k, v in report.items() if k != "_videos"}
    write_text_atomic(out / "report.json", json.dumps(body, indent=2) + "\n")
    md = [
        f"# Evaluation of `{report['model_dir']}`",
        "",
        f"Split `{report['split']}` of `{report['data']}`: {report['videos']} videos, "
        f"{report['clips']} clips. Thresholds (chosen on val): "
        f"{report.get('model_thresholds')}; embeddings: `{report['embedding_model']}`.",
        "",
        table(report),
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(md))
    plots = []
    if videos:
        plots.append(plot_timeline(videos[0], out / "timeline.png"))
    if "model_threshold_curves" in report:
        plots.append(
            plot_threshold_curves(report["model_threshold_curves"], out / "threshold_curves.png")
        )
    body["plots"] = [str(p) for p in plots]
    write_text_atomic(out / "report.json", json.dumps(body, indent=2) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(video: dict, png: Path) -> Path:
    """One video: speak/update probabilities, predicted vs reference speech and updates, and the
    number of completed nodes in the tracked vs the reference state."""
    plt = _plt()
    labels, traces, tree = video["labels"], video["traces"], video["tree"]
    fps = labels.clip.fps
    t = [tr.time for tr in traces]
    fig, axes = plt.subplots(3, 1, figsize=(11, 7), sharex=True)
    ax = axes[0]
    ax.plot(t, [tr.speak_prob for tr in traces], lw=1, label="P(speak)")
    ax.plot(t, [tr.update_prob for tr in traces], lw=1, label="P(update)")
    ax.set_ylabel("probability")
    ax.legend(loc="upper right")
    ax = axes[1]
    ref_speak = [f / fps for f in labels.responses]
    ax.vlines(ref_speak, 0.5, 1.0, color="k", label="reference speech")
    ax.vlines(
        [tr.time for tr in traces if tr.response],
        0.0,
        0.5,
        color="tab:red",
        label="predicted speech",
    )
    ax.vlines(
        [f / fps for f in labels.dst_updates], 1.1, 1.6, color="tab:green", label="reference update"
    )
    ax.vlines(
        [tr.time for tr in traces if tr.dst_text],
        1.6,
        2.1,
        color="tab:orange",
        label="predicted update",
    )
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=7, ncol=4)
    ax = axes[2]
    if tree is not None:
        ax.plot(
            t, [sum(s == COMPLETED for s in tr.state.values()) for tr in traces], label="tracked"
        )
        ax.plot(
            t,
            [
                sum(s == COMPLETED for s in tree.state_before((tr.frame + 1) / fps).values())
                for tr in traces
            ],
            "--",
            label="reference",
        )
        ax.set_ylabel("completed nodes")
        ax.legend(loc="upper left")
    ax.set_xlabel("seconds")
    fig.suptitle(labels.clip.video_uid)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_threshold_curves(curves: dict, png: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (head, rows) in zip(axes, curves.items(), strict=False):
        th = [r["threshold"] for r in rows]
        for key in ("precision", "recall", "f1"):
            ax.plot(th, [r[key] for r in rows], label=key)
        ax.set_title(f"{head} (val, teacher-forced)")
        ax.set_xlabel("threshold")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
