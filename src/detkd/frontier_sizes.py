"""``make frontier``: more student sizes on the speed/accuracy plane, as DVC experiments.

Contract: ``python -m detkd.frontier_sizes`` runs one DVC experiment per ``frontier.sizes.<name>`` in
params.yaml (``dvc exp run --temp -n frontier-<name> -S student.<key>=<value> ...``; visible in
``dvc exp show``). Each experiment trains that student size as baseline and as distilled student (the
teacher comes from DVC's run cache), exports and benchmarks it like the default. Experiments of the same
name that already finished are reused (an interrupted run resumes; ``--rerun`` forces). Their headline
numbers (``reports/summary.json``) and the CPU they were timed on go to ``reports/frontier_sizes.json``,
then ``dvc repro frontier`` redraws ``reports/frontier.{json,md,png}`` with every size on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from detkd.cli import run_main
from detkd.compare import experiment_results, run_experiment
from detkd.config import load_params
from detkd.errors import DetkdError
from detkd.frontier import SIZE_KEYS
from detkd.io import atomic_write_json

SUMMARY = "reports/summary.json"


@dataclass(frozen=True)
class SizeExperiment:
    size: str
    sets: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"frontier-{self.size}"

    def set_params(self) -> list[str]:
        return list(self.sets)


def flatten_sets(prefix: str, override: dict) -> list[str]:
    """``{"fasterrcnn": {"representation_size": 64}}`` -> ``["student.fasterrcnn.representation_size=64"]``."""
    out = []
    for key, value in override.items():
        if isinstance(value, dict):
            out += flatten_sets(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}.{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return out


def describe(student) -> str:
    """A short label of a student size: backbone, FPN width and the head's proposals/representation."""
    two = student.fasterrcnn
    return (f"{student.backbone}, FPN {student.fpn_channels}, RoI head {two.representation_size}, "
            f"{two.rpn_post_nms_top_n_test} proposals")


def size_record(name: str, metrics: dict, cpu: str, label: str) -> dict:
    missing = [k for k in SIZE_KEYS if k not in metrics]
    if missing:
        raise DetkdError(f"experiment frontier-{name}: {SUMMARY} lacks {missing}; was it run with this version?")
    return {"name": name, "label": label, "cpu": cpu,
            **{k: metrics[k] for k in ("teacher_ap", *SIZE_KEYS, "teacher_p50_ms") if k in metrics}}


def _benchmark_cpu(rev: str) -> str:
    proc = subprocess.run(["git", "show", f"{rev}:reports/benchmark.json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return "unknown"
    return json.loads(proc.stdout)["environment"]["cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="reports/frontier_sizes.json")
    parser.add_argument("--rerun", action="store_true", help="run every size again even if its experiment finished")
    parser.add_argument("--log-dir", default="reports/frontier_logs")
    args = parser.parse_args()

    params = load_params(args.params)
    if not params.frontier.sizes:
        raise DetkdError(f"{args.params}: frontier.sizes is empty; add student sizes to put on the frontier")
    experiments = [SizeExperiment(name, tuple(flatten_sets("student", override)))
                   for name, override in params.frontier.sizes.items()]
    done = experiment_results()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for i, exp in enumerate(experiments, 1):
        if exp.name in done and not args.rerun:
            print(f"frontier: [{i}/{len(experiments)}] {exp.name}: finished earlier, reused", flush=True)
            continue
        print(f"frontier: [{i}/{len(experiments)}] {exp.name} ({' '.join(exp.sets)}); log: {log_dir / exp.name}.log",
              flush=True)
        if not run_experiment(exp, log_dir, os.cpu_count() or 1):
            raise DetkdError(f"experiment {exp.name} failed; see {log_dir / exp.name}.log")
    done = experiment_results()
    records = []
    for exp in experiments:
        if exp.name not in done:
            raise DetkdError(f"experiment {exp.name} is not among the finished experiments of `dvc exp show`")
        metrics = done[exp.name]["metrics"].get(SUMMARY, {})
        label = describe(params.student_size(exp.size))
        records.append(size_record(exp.size, metrics, _benchmark_cpu(done[exp.name]["rev"]), label))
        r = records[-1]
        print(f"frontier: {exp.name}: AP baseline {r['baseline_ap']:.3f} -> distilled {r['distilled_ap']:.3f} at "
              f"{r['distilled_p50_ms']:.1f} ms", flush=True)
    atomic_write_json(args.out, {"sizes": records})
    proc = subprocess.run(["dvc", "repro", "frontier"], text=True)
    if proc.returncode != 0:
        raise DetkdError("dvc repro frontier failed (see above)")


if __name__ == "__main__":
    run_main(main)
