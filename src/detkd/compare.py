"""``make compare``: every distillation method against the baseline student, tuned alike, on both families.

Contract: ``python -m detkd.compare`` runs, per family (``--families``, both by default):

1. the teacher, as the DVC experiment ``cmp-<family>-teacher`` (``dvc exp run --temp ... train_teacher``);
   the later experiments restore it from DVC's run cache;
2. the tuning sweep (``detkd.tune``): every method's loss weights at 0.01x, 0.1x and 1x their published
   values, one seed, trained on the ``fit`` split and scored on ``dev`` (both carved from train; val is not
   read), and the best factor's weights written into ``params.yaml`` (``distill.<family>.<method>``);
3. one DVC experiment per method and student seed (``cmp-<family>-<method>-s<seed>``: ``dvc exp run --temp
   -S distill.method=<method> -S train_student.seed=<seed> -S model.family=<family> evaluate``), each
   training the baseline and the distilled student from that seed, so gains are paired per seed;
4. a step-time breakdown per method (``detkd.step_time``), and ``reports/kd_compare.{json,md,png}``.

Finished work is reused: tuning records whose settings are unchanged, and experiments whose recorded
params equal what they would run with now (a stale one is removed and re-run), so an interrupted
comparison resumes. With ``--jobs N`` runs go N at a time, each with ``cpu_count // N`` threads, once the
run whose teacher or baseline student they reuse has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from detkd.config import FAMILIES
from detkd.errors import DetkdError
from detkd.tune import SHORT

DEFAULT_METHODS = ("fitnet", "dsig", "drkd", "gid", "defeat", "mar")
PRETRAINED_DIR = "models/pretrained"  # the workspace's pretrain stage output (make compare runs it first)


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment of the comparison; ``method`` "teacher" is the family's teacher-only run."""

    family: str
    method: str
    seed: int = 0

    @property
    def name(self) -> str:
        if self.method == "teacher":
            return f"cmp-{SHORT[self.family]}-teacher"
        return f"cmp-{SHORT[self.family]}-{self.method}-s{self.seed}"

    @property
    def target(self) -> str:
        return "train_teacher" if self.method == "teacher" else "evaluate"

    def set_params(self) -> list[str]:
        sets = [f"model.family={self.family}"]
        if self.method != "teacher":
            sets = [f"distill.method={self.method}", f"train_student.seed={self.seed}", *sets]
        return sets


def plan(families: list[str], methods: list[str], seeds: int) -> list[Experiment]:
    """Experiments in dependency order: per family its teacher, then per seed every method (the seed's
    first method trains that seed's baseline student)."""
    out = []
    for family in families:
        out.append(Experiment(family, "teacher"))
        out += [Experiment(family, m, s) for s in range(seeds) for m in methods]
    return out


def prerequisite(exp: Experiment, experiments: list[Experiment]) -> Optional[Experiment]:
    """The experiment whose run-cache entries (teacher, baseline student) ``exp`` reuses, if any."""
    if exp.method == "teacher":
        return None
    same_seed = [e for e in experiments if e.family == exp.family and e.method != "teacher" and e.seed == exp.seed]
    if exp != same_seed[0]:
        return same_seed[0]
    return next((e for e in experiments if e.family == exp.family and e.method == "teacher"), None)


def expected_params(params_raw: dict, exp: Experiment) -> dict:
    """The params.yaml sections ``exp``'s result depends on, as they are now (with its ``-S`` values)."""
    from detkd.config import deep_merge

    raw = deep_merge(params_raw, {"model": {"family": exp.family}})
    keep = {k: raw.get(k) for k in ("seed", "data", "model", "teacher", "train_teacher")}
    if exp.method != "teacher":
        keep["student"] = raw.get("student")
        keep["train_student"] = {**(raw.get("train_student") or {}), "seed": exp.seed}
        keep["distill"] = {"method": exp.method,
                           exp.method: ((raw.get("distill") or {}).get(exp.family) or {}).get(exp.method)}
    return keep


def is_current(result: dict, params_raw: dict, exp: Experiment) -> bool:
    """Whether a finished experiment ran with the params it would run with now (a stale one is re-run)."""
    from detkd.config import parse_params

    recorded = (result.get("params") or {}).get("params.yaml")
    if not recorded:
        return False
    try:  # both through the validator, so defaults and number formats compare equal
        then = parse_params(recorded).model_dump()
        now = parse_params(params_raw).model_dump()
    except DetkdError:
        return False
    return expected_params(then, exp) == expected_params(now, exp)


# ---- running ------------------------------------------------------------------------------------------

def _dvc(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], text=True, capture_output=True, **kwargs)


def experiment_results() -> dict[str, dict]:
    """Name -> {"rev", "metrics": {file: data}, "params": {file: data}} for every finished experiment of the
    workspace's baseline commit (``dvc exp show --json``)."""
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


def _thread_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_experiment(exp: Experiment, log_dir: Path, threads: int, retries: int = 3) -> bool:
    """``dvc exp run --temp`` of ``exp`` up to its target stage; log in ``log_dir/<name>.log``. True on success."""
    log = log_dir / f"{exp.name}.log"
    cmd = ["exp", "run", "--temp", "-n", exp.name]
    for s in exp.set_params():
        cmd += ["-S", s]
    cmd.append(exp.target)
    for attempt in range(retries):
        with open(log, "w") as fh:
            proc = subprocess.run(["dvc", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=_thread_env(threads), text=True)
        if proc.returncode == 0:
            return True
        if "lock" not in log.read_text()[-2000:].lower():  # only DVC lock contention is worth a retry
            return False
        time.sleep(10 * (attempt + 1))
    return False


@dataclass
class Job:
    """Something to run (a DVC experiment or a tuning run), after the job named ``after``."""

    name: str
    run: Callable[[int], bool]  # threads -> success
    after: Optional[str] = None
    label: str = field(default="")


def run_jobs(jobs: list[Job], done: set[str], parallel: int, what: str = "compare") -> list[str]:
    """Run the jobs not in ``done``, ``parallel`` at a time, each once its ``after`` job has finished.
    Returns the names that failed (their dependants are skipped)."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    pending = [j for j in jobs if j.name not in done]
    failed: list[str] = []
    finished = set(done)
    running = {}
    total = len(pending)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while pending or running:
            for job in list(pending):
                if job.after is not None and job.after in failed:
                    pending.remove(job)
                    failed.append(job.name)
                    print(f"{what}: skipping {job.name} ({job.after} failed)", flush=True)
                elif len(running) < parallel and (job.after is None or job.after in finished):
                    pending.remove(job)
                    print(f"{what}: [{total - len(pending)}/{total}] {job.name} {job.label}".rstrip(), flush=True)
                    running[pool.submit(job.run, threads)] = (job, time.time())
            if not running:
                continue
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in ready:
                job, start = running.pop(fut)
                ok = fut.result()
                (finished.add if ok else failed.append)(job.name)
                print(f"{what}: {job.name} {'done' if ok else 'FAILED'} in {time.time() - start:.0f} s", flush=True)
    return failed


def experiment_jobs(experiments: list[Experiment], log_dir: Path) -> list[Job]:
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for exp in experiments:
        pre = prerequisite(exp, experiments)
        jobs.append(Job(exp.name, lambda threads, e=exp: run_experiment(e, log_dir, threads),
                        pre.name if pre else None, f"({' '.join(exp.set_params())}; log {log_dir / exp.name}.log)"))
    return jobs


# ---- tuning ----------------------------------------------------------------------------------------------

def tune_records(work: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(work.glob("tune-*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def tune_key(params, point, teacher: Path) -> str:
    """What a tuning record depends on; a record with another key is re-run."""
    from detkd.cli import fingerprint
    from detkd.tune import point_params

    p = point_params(params, point)
    sections = (p.model, p.student, p.train_student, p.data, p.pretrain)  # keys at their defaults left out: a new key
    return fingerprint(*(s.model_dump(exclude_defaults=True) for s in sections),  # does not void old records
                       p.distill.hparams(point.family) if point.method != "none" else {},
                       p.seed, teacher.name if point.method != "none" else "")


def run_tuning(params, families: list[str], methods: list[str], teachers: dict[str, Path], parallel: int,
               work: Path, log_dir: Path) -> list[dict]:
    """The sweep of ``detkd.tune`` for ``families`` x ``methods``; returns every current record."""
    from detkd.tune import tune_plan

    work.mkdir(parents=True, exist_ok=True)
    points = tune_plan(families, methods)
    keys = {pt.name: tune_key(params, pt, teachers[pt.family]) for pt in points}
    records = tune_records(work)
    done = {n for n, r in records.items() if r.get("key") == keys.get(n)}

    def runner(pt):
        def run(threads: int) -> bool:
            cmd = [sys.executable, "-m", "detkd.tune", "--family", pt.family, "--method", pt.method,
                   "--scale", repr(pt.scale), "--work", str(work), "--key", keys[pt.name],
                   "--pretrained", PRETRAINED_DIR]
            if pt.method != "none":
                cmd += ["--teacher", str(teachers[pt.family])]
            with open(log_dir / f"{pt.name}.log", "w") as fh:
                return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_thread_env(threads)).returncode == 0
        return run

    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = [Job(pt.name, runner(pt), label=f"(log {log_dir / pt.name}.log)") for pt in points]
    failed = run_jobs(jobs, done, parallel, what="tune")
    if failed:
        raise DetkdError(f"tuning runs failed: {', '.join(failed)} (logs in {log_dir}); fix and re-run make compare")
    records = tune_records(work)
    return [records[pt.name] for pt in points]


def apply_tuning(records: list[dict], params_path: str) -> list[str]:
    """Write each (family, method)'s chosen weights into params.yaml; returns one line per change."""
    from detkd.tune import apply_choice, choose, ordered_hparams

    lines = []
    for (family, method), rec in choose(records).items():
        hparams = ordered_hparams(method, family, rec["hparams"])
        if apply_choice(params_path, family, method, hparams):
            lines.append(f"compare: {params_path}: distill.{family}.{method} <- {hparams} "
                         f"(x{rec['scale']:g}, dev AP {rec['dev_ap']:.3f})")
    return lines


# ---- collecting ------------------------------------------------------------------------------------------

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


# ---- main ------------------------------------------------------------------------------------------------

def _refresh(experiments: list[Experiment], params_raw: dict) -> tuple[dict, set[str]]:
    """Finished experiments, and the names among ``experiments`` that are current (stale ones removed)."""
    results = experiment_results()
    stale = [e.name for e in experiments if e.name in results and not is_current(results[e.name], params_raw, e)]
    if stale:
        print(f"compare: re-running {len(stale)} experiment(s) whose params changed: {', '.join(stale)}", flush=True)
        _dvc(["exp", "remove", *stale])
        results = {k: v for k, v in results.items() if k not in stale}
    return results, {e.name for e in experiments if e.name in results}


def main(argv: Optional[list[str]] = None) -> None:
    import yaml

    from detkd.compare_report import build_report, write_report
    from detkd.config import load_params

    parser = argparse.ArgumentParser(prog="python -m detkd.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per family")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (threads are split)")
    parser.add_argument("--no-tune", action="store_true", help="keep params.yaml's weights (no sweep)")
    parser.add_argument("--step-iters", type=int, default=20, help="timed steps per method (0: skip timing)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="reports/kd_compare", help="writes <out>.json, <out>.md, <out>.png")
    parser.add_argument("--work", default=".dvc/tmp/compare", help="tuning records and logs")
    parser.add_argument("--no-run", action="store_true", help="only collect finished runs and report")
    args = parser.parse_args(argv)

    from detkd.distill import METHODS

    unknown = [m for m in args.methods if m not in METHODS or m == "none"]
    if unknown:
        raise DetkdError(f"--methods: unknown {unknown}; choose from {', '.join(m for m in sorted(METHODS) if m != 'none')}")
    if args.seeds < 1 or args.jobs < 1:
        raise DetkdError("--seeds and --jobs must be >= 1")
    work, logs = Path(args.work), Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    params_raw = lambda: yaml.safe_load(Path(args.params).read_text())  # noqa: E731  (re-read after tuning)

    experiments = plan(args.families, args.methods, args.seeds)
    teachers_exps = [e for e in experiments if e.method == "teacher"]
    results, done = _refresh(teachers_exps, params_raw())
    if not args.no_run:
        failed = run_jobs(experiment_jobs(teachers_exps, logs), done, args.jobs)
        if failed:
            raise DetkdError(f"teacher experiment(s) failed: {', '.join(failed)} (logs in {logs})")
        results, _ = _refresh(teachers_exps, params_raw())
    teachers = {e.family: teacher_checkpoint(results[e.name]["rev"]) for e in teachers_exps if e.name in results}

    if not args.no_tune:  # a params.yaml the sweep could not write back fails now, not after the sweep
        from detkd.tune import check_editable

        for family in args.families:
            for method in args.methods:
                check_editable(args.params, family, method)
    tuning = []
    if not args.no_tune and teachers:
        params = load_params(args.params)
        if args.no_run:
            tuning = [r for r in tune_records(work).values() if r["family"] in teachers]
        else:
            tuning = run_tuning(params, list(teachers), args.methods, teachers, args.jobs, work, logs)
            for line in apply_tuning(tuning, args.params):
                print(line, flush=True)

    students = [e for e in experiments if e.method != "teacher"]
    results, done = _refresh(experiments, params_raw())
    if not args.no_run:
        failed = run_jobs(experiment_jobs(experiments, logs), done, args.jobs)
        if failed:
            print(f"compare: {len(failed)} experiment(s) failed: {', '.join(failed)}", file=sys.stderr)
        results, _ = _refresh(experiments, params_raw())
    records = [record_from_metrics(e, results[e.name]) for e in students if e.name in results]
    if not records:
        raise DetkdError("no finished comparison experiments to report (run without --no-run)")

    params = load_params(args.params)
    step_times = []
    if args.step_iters:
        step_times = measure_all_step_times(params, teachers, args.methods, args.step_iters)
    report = build_report(records, step_times, tuning)
    write_report(report, args.out)
    print(f"compare: wrote {args.out}.json, {args.out}.md, {args.out}.png")


def measure_all_step_times(params, teachers: dict[str, Path], methods: list[str], iters: int) -> list[dict]:
    """Step-time breakdown per (family, method), with each family's trained teacher."""
    from detkd.step_time import measure_step_times

    out = []
    for family, teacher in teachers.items():
        fam_params = params.model_copy(update={"model": params.model.model_copy(update={"family": family})})
        for method in methods:
            print(f"compare: timing {family}/{method} ({iters} steps)", flush=True)
            out.append(measure_step_times(fam_params, "data/prepared", teacher, method, iters=iters,
                                          pretrained_dir=PRETRAINED_DIR))
    return out


if __name__ == "__main__":
    from detkd.cli import run_main

    run_main(main)
