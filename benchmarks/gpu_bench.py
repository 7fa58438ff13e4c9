"""Every GPU claim of the project, in one command (``make gpu-bench``), offline.

    python benchmarks/gpu_bench.py                    # GPU: SmolVLM2-2.2B, emulated 24 GB card
    python benchmarks/gpu_bench.py --dry-run          # CPU: the same stages on the tiny model

Set-up (no hub needed): a synthetic dataset in the real formats and a model folder of the
``--arch`` architecture from our configs with random weights and a locally trained tokenizer
padded to the real vocabulary size (``dst-train make-tiny-model --arch``). The run recipe is
``--recipe`` (default: the 2.2B LoRA recipe, the one meant for one 24 GB card per process).
Stages, each in its own processes, each writing ``OUT/gpu_<stage>.json`` as soon as it ends:

  autotune    ``dst-train autotune`` under the emulated target (probes, seconds, chosen
              micro-batch, peak/target)
  verify      ``--verify-steps`` training steps at the chosen size (``--verify-micro``, else
              the autotune stage's choice) on the worst-case sample, in a fresh process: peak,
              OOM or not. Stepping stops early at the stage's deadline (or after
              ``--verify-seconds``), and the record says how many steps ran
  throughput  benchmarks/throughput.py: our loop vs the HF Trainer with the same DeepSpeed
              config at the tuned micro-batch (tokens/s, peak, MFU, share of time waiting
              for batches)
  fit         benchmarks/throughput.py --fit-only: the largest micro-batch each stack fits
              under the same cap, every probe a fresh process, the search started at the
              throughput micro-batch (the dry run caps it there: one probe a stack)
  bench       benchmarks/autotune_bench.py: our search vs doubling + binary search
  streaming   benchmarks/streaming.py: streaming evaluation (random weights, heads that vary
              per frame) of ``--stream-clips`` test clips cut to ``--stream-frames`` frames,
              batch 1 vs 8: frames/s, and that batching changes no output

A stage that would start with less than ``--min-stage-s`` of ``--deadline-s`` left is skipped
and recorded as skipped, so a short lease still brings back the stages that ran. A stage past
its share of the deadline is killed with its processes; its record keeps its log's tail and
what it measured before (verify's steps, fit's probes, streaming's passes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import read_json_lines, write_result  # noqa: E402

STAGES = ("autotune", "verify", "throughput", "fit", "bench", "streaming")
GiB = 2**30


# frames of ProAssist's size: the loader then takes the path real data takes (a frame already
# the tower's 384 px is used as it is; a 64-px one goes through the processor's resize, 2-3x the
# CPU time per frame)
FRAME_PX = 384


def prepare(work: Path, arch: str, dry_run: bool, videos: int) -> dict:
    """Data and model folder (reused when present); returns the paths."""
    from dst_train.data.synthetic import DemoSpec, make_demo_data
    from dst_train.model.tiny import demo_corpus, make_arch_folder, make_tiny_model

    data, model = work / "data", work / "model"
    if not (data / "prepared").is_dir():
        size = DemoSpec.image_size if dry_run else FRAME_PX
        make_demo_data(data, seed=0, spec=DemoSpec(videos=videos, image_size=size))
    if not (model / "config.json").is_file():
        if dry_run:
            make_tiny_model(model, demo_corpus(data), seed=0, hidden=64, layers=2)
        else:
            make_arch_folder(model, demo_corpus(data), arch)
    return {"data": data, "model": model}


def overrides(paths: dict, work: Path, dry_run: bool) -> list[str]:
    """The recipe's options that change for a random-weight, offline run."""
    extra = ["model.cpu_dtype=fp32"] if dry_run else []
    return [
        f"data.root={paths['data']}",
        f"model.arch={paths['model']}",
        "model.pretrained=false",
        f"output_dir={work / 'run'}",
        "train.tensorboard=false",
        *extra,
    ]


class StageTimeout(RuntimeError):
    """A stage ran past its deadline; the message ends with its log's tail."""


def timed_out(e: StageTimeout, kept: dict, summary: dict) -> dict:
    """The record of a stage past its deadline: what it measured before (``kept``, and the
    ``summary``'s part of it), with the error and its log's tail."""
    return {**kept, "error": str(e)[-4000:], "summary": {"error": str(e)[-2000:], **summary}}


def _run(cmd: list[str], timeout: float, log: Path) -> None:
    """Run ``cmd``; its output goes to ``log``; a failure raises with the log's tail. Past
    ``timeout`` the command is killed with every process it started (its own session: a fit
    probe or a loader worker left running would hold the GPU the next stage needs)."""
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            tail = log.read_text()[-4000:]
            raise StageTimeout(
                f"past its {timeout:.0f} s: {' '.join(cmd[:4])} ...\n{tail}"
            ) from None
    if code != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"exit {code}: {' '.join(cmd[:4])} ...\n{tail}")


def stage_autotune(a, ov: list[str], work: Path, timeout: float) -> dict:
    out = work / "autotune"
    cmd = [sys.executable, "-m", "dst_train.cli", "autotune", "--config", a.recipe]
    cmd += ["--target-gb", str(a.target_gb), "--fraction", str(a.fraction), "--no-cache"]
    cmd += ["--emulate-turing"]
    cmd += ["--max-micro", str(a.max_micro), "--out", str(out), *ov]
    t0 = time.perf_counter()
    _run(cmd, timeout, work / "autotune.log")
    report = json.loads((out / "autotune.json").read_text())
    target = a.target_gb * GiB
    return {
        "wall_seconds": time.perf_counter() - t0,
        "report": report,
        "summary": {
            "probes": len(report["probes"]),
            "search_seconds": report["seconds"],
            "micro_batch": report["searched_micro_batch"],
            "peak_gib": report["peak_bytes"] / GiB,
            "peak_over_target": report["peak_bytes"] / target,
            "peak_over_limit": report["peak_bytes"] / report["limit_bytes"],
        },
    }


# after stepping stops: the probe's record, the child's exit and the stage's JSON
VERIFY_EXIT_S = 30.0


def stage_verify(a, ov: list[str], work: Path, micro: int, timeout: float) -> dict:
    """``--verify-steps`` training steps at ``micro`` on the worst case, in a fresh process,
    stepping until the steps are done or the stage's time is nearly out (``--verify-seconds``
    caps it too): a lease too short for all the steps still brings back the ones that ran."""
    stop_at = time.time() + timeout - VERIFY_EXIT_S
    if a.verify_seconds:
        stop_at = min(stop_at, time.time() + a.verify_seconds)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "autotune_bench.py"), "--child"]
    cmd += ["--method", "verify", "--overrides", json.dumps(ov), "--config", a.recipe]
    cmd += ["--target-gb", str(a.target_gb), "--limit-bytes", "0", "--stop-at", str(stop_at)]
    cmd += ["--verify-steps", str(a.verify_steps), "--max-micro", str(micro)]
    log = work / "verify.log"
    _run(cmd, timeout, log)
    line = next(x for x in log.read_text().splitlines() if x.startswith("RESULT "))
    probe = json.loads(line[len("RESULT ") :])
    target = a.target_gb * GiB
    return {
        "probe": probe,
        "summary": {
            "micro_batch": micro,
            "steps_asked": a.verify_steps,
            "steps_run": probe["steps"],
            "complete": probe["steps"] >= a.verify_steps,
            "real_steps": probe["real_steps"],
            "oom": probe["oom"],
            "peak_gib": probe["peak_bytes"] / GiB,
            "peak_over_target": probe["peak_bytes"] / target,
            "seconds": probe["seconds"],
            "seconds_per_step": probe["seconds"] / max(probe["steps"], 1),
        },
    }


def stage_script(a, script: str, name: str, work: Path, paths: dict, timeout: float, extra):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--arch", str(paths["model"])]
    cmd += ["--data", str(paths["data"]), "--config", a.recipe, "--target-gb", str(a.target_gb)]
    cmd += ["--fraction", str(a.fraction), "--out", str(work / "results"), "--name", name]
    _run(cmd + extra, timeout, work / f"{name}.log")
    record = json.loads((work / "results" / f"{name}.json").read_text())
    summary = {k: record[k] for k in ("rows", "fits", "ratios") if record.get(k)}
    return {**record, "summary": summary}


def stage_fit(a, work: Path, paths: dict, timeout: float, size: int, out: Path | None) -> dict:
    """throughput.py's fit searches, a bracket around the throughput size. Its probes go to
    ``--fit-probes`` as they end: a stage cut short by its deadline records the probes that
    ran, and a rerun goes on from them: ``--fit-resume`` (the same work folder on a warm
    machine) or ``--fit-probes`` (a log carried in from a lease's ``OUT/gpu_fit_probes.jsonl``).
    Otherwise the work folder's log is an earlier run's, perhaps of other code: it is cleared."""
    cap = size if a.dry_run else max(32, 2 * size)
    log = a.fit_probes or work / "fit_probes.jsonl"
    if a.fit_probes is None and not a.fit_resume:
        log.unlink(missing_ok=True)
    extra = ["--fit-only", "--fit-from", str(size), "--max-micro", str(cap)]
    extra += ["--fit-probes", str(log)]
    try:
        return stage_script(a, "throughput.py", "fit", work, paths, timeout, extra)
    except StageTimeout as e:
        probes = read_json_lines(log)
        return timed_out(e, {"probes": probes}, {"probes": probes})
    finally:
        if log.exists() and out is not None:  # it comes back from a lease beside the records
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, out / "gpu_fit_probes.jsonl")


def stage_streaming(a, work: Path, paths: dict, timeout: float) -> dict:
    """benchmarks/streaming.py on ``--stream-clips`` test clips cut to ``--stream-frames``
    frames. It writes its record after every timed pass: a stage cut short by its deadline
    keeps the passes that ran."""
    result = work / "results" / "streaming.json"
    result.unlink(missing_ok=True)  # an earlier run's is not this one's
    cmd = [sys.executable, str(ROOT / "benchmarks" / "streaming.py")]
    cmd += ["--random-arch", str(paths["model"]), "--data", str(paths["data"])]
    cmd += ["--dtype", "fp32" if a.dry_run else "fp16", "--batches", "1,8"]
    cmd += ["--clips", str(a.stream_clips), "--split", "test"]
    cmd += ["--max-frames", str(a.stream_frames), "--repeats", str(a.stream_repeats)]
    cmd += ["--speak-threshold", "0.6", "--update-threshold", "0.6"]
    cmd += ["--max-new-tokens", "4" if a.dry_run else "40"]
    cmd += ["--out", str(work / "results"), "--name", "streaming"]
    try:
        _run(cmd, timeout, work / "streaming.log")
    except StageTimeout as e:
        record = json.loads(result.read_text()) if result.exists() else {"rows": []}
        return timed_out(e, record, {"rows": record["rows"]})
    record = json.loads(result.read_text())
    return {**record, "summary": {"rows": record["rows"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps")
    ap.add_argument("--arch", default="smolvlm2-2.2b")
    ap.add_argument("--recipe", default=str(ROOT / "launch/configs/smolvlm2-2.2b-lora.yaml"))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--target-gb", type=float, default=24.0, help="card to emulate (GiB)")
    ap.add_argument("--fraction", type=float, default=0.9)
    ap.add_argument("--verify-steps", type=int, default=100)
    ap.add_argument(
        "--verify-micro", type=int, help="verify's micro-batch (default: the autotune stage's)"
    )
    ap.add_argument(
        "--verify-seconds",
        type=float,
        default=0.0,
        help="verify: stop stepping this long after the stage starts (0: at its deadline)",
    )
    ap.add_argument("--max-micro", type=int, default=64)
    ap.add_argument("--throughput-steps", type=int, default=12)
    ap.add_argument(
        "--throughput-micro",
        type=int,
        help="throughput's and fit's micro-batch (default: the autotune stage's choice, else 2)",
    )
    ap.add_argument("--videos", type=int, default=24, help="synthetic dataset size")
    ap.add_argument("--stream-clips", type=int, default=8, help="clips the streaming stage runs")
    ap.add_argument(
        "--stream-frames",
        type=int,
        default=32,
        help="streaming: each clip's first N frames (0: all)",
    )
    ap.add_argument("--stream-repeats", type=int, default=2, help="streaming: timed rounds")
    ap.add_argument(
        "--fit-probes",
        type=Path,
        help="fit: the probe log to go on from (default WORK/fit_probes.jsonl)",
    )
    ap.add_argument(
        "--fit-resume",
        action="store_true",
        help="fit: go on from WORK/fit_probes.jsonl (an earlier command on the same machine)",
    )
    ap.add_argument("--deadline-s", type=float, default=2400.0, help="whole run, seconds")
    ap.add_argument("--min-stage-s", type=float, default=90.0)
    ap.add_argument("--work", type=Path, help="scratch folder (default runs/gpu-bench[-dry])")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    a = ap.parse_args()
    if a.dry_run:  # verify: more steps than fit (~0.4 s each here), so it stops at --verify-seconds
        a.verify_steps, a.verify_seconds = 1000, a.verify_seconds or 25.0
        a.max_micro, a.throughput_steps, a.stream_clips = 4, 4, 2
        a.stream_frames, a.stream_repeats = 0, 1
    work = a.work or ROOT / ("runs/gpu-bench-dry" if a.dry_run else "runs/gpu-bench")
    out = a.out or (work / "results" if a.dry_run else None)
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, a.arch, a.dry_run, a.videos)
    ov = overrides(paths, work, a.dry_run)
    micro = None
    summary = {}
    for stage in a.stages.split(","):
        left = a.deadline_s - (time.perf_counter() - start)
        if left < a.min_stage_s:
            summary[stage] = {"skipped": f"{left:.0f} s of the deadline left"}
            continue
        t0 = time.perf_counter()
        size = a.throughput_micro or micro or 2  # throughput's and fit's micro-batch
        try:
            if stage == "autotune":
                record = stage_autotune(a, ov, work, left)
                micro = record["summary"]["micro_batch"]
            elif stage == "verify":
                checked = a.verify_micro or micro
                if not checked:
                    raise RuntimeError("no micro-batch to verify: pass --verify-micro")
                record = stage_verify(a, ov, work, checked, left)
            elif stage == "throughput":
                extra = ["--micro-batch", str(size), "--no-fit"]
                extra += ["--steps", str(a.throughput_steps), "--warmup", "3"]
                record = stage_script(a, "throughput.py", "throughput", work, paths, left, extra)
            elif stage == "fit":
                record = stage_fit(a, work, paths, left, size, out)
            elif stage == "streaming":
                record = stage_streaming(a, work, paths, left)
            elif stage == "bench":
                extra = ["--verify-steps", "0", "--max-micro", str(a.max_micro)]
                record = stage_script(a, "autotune_bench.py", "bench", work, paths, left, extra)
            else:
                raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        except RuntimeError as e:
            record = {"error": str(e)[-4000:]}
            print(f"stage {stage} failed: {str(e)[-2000:]}", flush=True)
        record["stage_seconds"] = time.perf_counter() - t0
        summary[stage] = record.get("summary", {k: record[k] for k in ("error",) if k in record})
        path = write_result(f"gpu_{stage}", {"dry_run": a.dry_run, **record}, out)
        print(f"stage {stage}: {record['stage_seconds']:.0f} s -> {path}", flush=True)
    print(json.dumps(summary, indent=2, default=str))
    if any("error" in v for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
