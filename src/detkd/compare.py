"""``make compare``: every distillation method against the baseline student, over seeds and families.

Contract: ``python -m detkd.compare`` runs one DVC experiment per (family, method, seed)
(``dvc exp run --temp -n cmp-<family>-<method>-s<seed> -S distill.method=<method>
-S train_student.seed=<seed> [-S model.family=<family>]``; visible in ``dvc exp show``), reusing
experiments of the same name that already finished (so an interrupted comparison resumes), then times
a step of each method (``detkd.step_time``) and writes ``reports/kd_compare.json``, ``.md`` and ``.png``.

Each experiment trains the baseline student and the distilled student from the same seed (same
initialisation and data order), so gains are paired per seed. The teacher of a family is trained once
(the first experiment of that family) and restored from DVC's run cache by the others; likewise the
baseline student of each seed. With ``--jobs N`` experiments run N at a time, each with
``cpu_count // N`` threads, once the experiment that trains their shared teacher/student has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from detkd.errors import DetkdError

DEFAULT_METHODS = ("fitnet", "dsig", "drkd", "gid", "defeat", "mar")
FAMILIES = ("fasterrcnn", "retinanet")
SHORT = {"fasterrcnn": "frcnn", "retinanet": "retina"}


@dataclass(frozen=True)
class Experiment:
    family: str
    method: str
    seed: int
    default_family: str

    @property
    def name(self) -> str:
        return f"cmp-{SHORT[self.family]}-{self.method}-s{self.seed}"

    def set_params(self) -> list[str]:
        sets = [f"distill.method={self.method}", f"train_student.seed={self.seed}"]
        if self.family != self.default_family:
            sets.append(f"model.family={self.family}")
        return sets


def plan(default_family: str, methods: list[str], seeds: int, other_seeds: int) -> list[Experiment]:
    """Experiments in dependency order: per family, seed 0's first method trains the teacher; each
    seed's first method trains that seed's baseline student."""
    out = []
    for family in (default_family, *[f for f in FAMILIES if f != default_family]):
        n = seeds if family == default_family else other_seeds
        out += [Experiment(family, m, s, default_family) for s in range(n) for m in methods]
    return out


def prerequisite(exp: Experiment, experiments: list[Experiment]) -> Optional[Experiment]:
    """The experiment whose run-cache entries (teacher, baseline student) ``exp`` reuses, if any."""
    same_family = [e for e in experiments if e.family == exp.family]
    same_seed = [e for e in same_family if e.seed == exp.seed]
    if exp != same_seed[0]:
        return same_seed[0]
    return same_family[0] if exp != same_family[0] else None


# ---- running experiments -------------------------------------------------------------------------

def _dvc(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], text=True, capture_output=True, **kwargs)


def experiment_results() -> dict[str, dict]:
    """Name -> {"rev", "metrics": {file: data}, "params": {...}} for every experiment of the workspace's
    baseline commit (``dvc exp show --json``)."""
    proc = _dvc(["exp", "show", "--json", "--no-fetch"])
    if proc.returncode != 0:
        raise DetkdError(f"dvc exp show failed: {proc.stderr.strip().splitlines()[-1:]}")
    return parse_exp_show(json.loads(proc.stdout or "[]"))


def parse_exp_show(rows: list[dict]) -> dict[str, dict]:
    """Flatten DVC 3's ``exp show --json`` (commit rows, each with ``experiments`` holding ``revs``) to
    name -> record, keeping only finished experiments (queued, running and failed ones have an
    ``executor``)."""
    out = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            if exp.get("executor"):
                continue
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                if not name or rev.get("error"):
                    continue
                data = rev.get("data") or {}
                out[name] = {
                    "rev": rev.get("rev"),
                    "metrics": {f: (v or {}).get("data", {}) for f, v in (data.get("metrics") or {}).items()},
                    "params": {f: (v or {}).get("data", {}) for f, v in (data.get("params") or {}).items()},
                }
    return out


def run_experiment(exp: Experiment, log_dir: Path, threads: int, retries: int = 3) -> bool:
    """``dvc exp run --temp`` for ``exp``; the log goes to ``log_dir/<name>.log``. True on success."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = log_dir / f"{exp.name}.log"
    cmd = ["exp", "run", "--temp", "-n", exp.name]
    for s in exp.set_params():
        cmd += ["-S", s]
    for attempt in range(retries):
        with open(log, "w") as fh:
            proc = subprocess.run(["dvc", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, text=True)
        if proc.returncode == 0:
            return True
        if "lock" not in log.read_text()[-2000:].lower():  # only DVC lock contention is worth a retry
            return False
        time.sleep(10 * (attempt + 1))
    return False


def run_all(experiments: list[Experiment], done: set[str], jobs: int, log_dir: Path) -> list[str]:
    """Run the experiments not in ``done``, ``jobs`` at a time, each after its prerequisite.
    Returns the names that failed (their dependants are skipped)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = [e for e in experiments if e.name not in done]
    failed: list[str] = []
    finished = set(done)
    running = {}
    total = len(pending)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for exp in list(pending):
                pre = prerequisite(exp, experiments)
                if pre is not None and pre.name in failed:
                    pending.remove(exp)
                    failed.append(exp.name)
                    print(f"compare: skipping {exp.name} ({pre.name} failed)", flush=True)
                elif len(running) < jobs and (pre is None or pre.name in finished):
                    pending.remove(exp)
                    print(f"compare: [{total - len(pending)}/{total}] {exp.name} "
                          f"({' '.join(exp.set_params())})", flush=True)
                    running[pool.submit(run_experiment, exp, log_dir, threads)] = (exp, time.time())
            if not running:
                continue
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in ready:
                exp, start = running.pop(fut)
                ok = fut.result()
                (finished.add if ok else failed.append)(exp.name)
                status = "done" if ok else f"FAILED (see {log_dir / (exp.name + '.log')})"
                print(f"compare: {exp.name} {status} in {time.time() - start:.0f} s", flush=True)
    return failed


# ---- collecting ------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """What one experiment measured, flattened from its DVC metrics."""

    family: str
    method: str
    seed: int
    teacher_ap: float
    baseline_ap: float
    distilled_ap: float
    baseline_s_per_iter: float
    distill_s_per_iter: float
    baseline_peak_mb: float
    distill_peak_mb: float
    rev: str = ""


def record_from_metrics(exp: Experiment, result: dict) -> RunRecord:
    m = result["metrics"]
    try:
        ev = m["reports/eval.json"]
        student, distill = m["reports/train/student.json"], m["reports/train/distill.json"]
        return RunRecord(
            family=exp.family, method=exp.method, seed=exp.seed, teacher_ap=ev["teacher"]["AP"],
            baseline_ap=ev["student"]["AP"], distilled_ap=ev["distilled"]["AP"],
            baseline_s_per_iter=student["seconds_per_iter"], distill_s_per_iter=distill["seconds_per_iter"],
            baseline_peak_mb=student["peak_memory_mb"], distill_peak_mb=distill["peak_memory_mb"],
            rev=result.get("rev") or "",
        )
    except KeyError as exc:
        raise DetkdError(f"experiment {exp.name}: its metrics lack {exc}; re-run it (dvc exp remove {exp.name})") from exc


def teacher_checkpoint(rev: str, repo: Path = Path(".")) -> Path:
    """The cached ``models/teacher.pt`` of experiment commit ``rev`` (from its ``dvc.lock``)."""
    import yaml

    lock = yaml.safe_load(subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=repo, text=True,
                                         capture_output=True, check=True).stdout)
    for out in lock["stages"]["train_teacher"]["outs"]:
        if out["path"] == "models/teacher.pt":
            md5 = out["md5"]
            cache = _dvc(["cache", "dir"], cwd=repo).stdout.strip() or str(repo / ".dvc" / "cache")
            path = Path(cache) / "files" / "md5" / md5[:2] / md5[2:]
            if not path.is_file():
                raise DetkdError(f"teacher of experiment {rev[:7]} is not in the DVC cache ({path})")
            return path
    raise DetkdError(f"experiment {rev[:7]}: dvc.lock has no models/teacher.pt output")


# ---- main ----------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    from detkd.compare_report import build_report, write_report
    from detkd.config import load_params

    parser = argparse.ArgumentParser(prog="python -m detkd.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="student seeds for the default family")
    parser.add_argument("--other-seeds", type=int, default=1, help="student seeds for the other family (0: skip it)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (threads are split)")
    parser.add_argument("--step-iters", type=int, default=20, help="timed steps per method (0: skip timing)")
    parser.add_argument("--out", default="reports/kd_compare", help="writes <out>.json, <out>.md, <out>.png")
    parser.add_argument("--logs", default=".dvc/tmp/compare-logs")
    parser.add_argument("--no-run", action="store_true", help="only collect finished experiments and report")
    args = parser.parse_args(argv)

    from detkd.distill import METHODS

    unknown = [m for m in args.methods if m not in METHODS or m == "none"]
    if unknown:
        raise DetkdError(f"--methods: unknown {unknown}; choose from {', '.join(m for m in sorted(METHODS) if m != 'none')}")
    if args.seeds < 1 or args.other_seeds < 0 or args.jobs < 1:
        raise DetkdError("--seeds must be >= 1, --other-seeds >= 0 and --jobs >= 1")
    params = load_params("params.yaml")
    experiments = plan(params.model.family, args.methods, args.seeds, args.other_seeds)
    results = experiment_results()
    if not args.no_run:
        failed = run_all(experiments, set(results), args.jobs, Path(args.logs))
        results = experiment_results()
        if failed:
            print(f"compare: {len(failed)} experiment(s) failed: {', '.join(failed)}", file=sys.stderr)
    records = [record_from_metrics(e, results[e.name]) for e in experiments if e.name in results]
    if not records:
        raise DetkdError("no finished comparison experiments to report (run without --no-run)")

    step_times = []
    if args.step_iters:
        step_times = measure_all_step_times(params, experiments, results, args.methods, args.step_iters)
    report = build_report(records, step_times, default_family=params.model.family)
    write_report(report, args.out)
    print(f"compare: wrote {args.out}.json, {args.out}.md, {args.out}.png")


def measure_all_step_times(params, experiments: list[Experiment], results: dict, methods: list[str],
                           iters: int) -> list[dict]:
    """Step-time breakdown per (family, method), with each family's trained teacher."""
    from detkd.step_time import measure_step_times

    out = []
    for family in dict.fromkeys(e.family for e in experiments):
        first = next((e for e in experiments if e.family == family and e.name in results), None)
        if first is None:
            continue
        teacher = teacher_checkpoint(results[first.name]["rev"])
        fam_params = params.model_copy(update={"model": params.model.model_copy(update={"family": family})})
        for method in methods:
            print(f"compare: timing {family}/{method} ({iters} steps)", flush=True)
            out.append(measure_step_times(fam_params, "data/prepared", teacher, method, iters=iters))
    return out


if __name__ == "__main__":
    from detkd.cli import run_main

    run_main(main)
