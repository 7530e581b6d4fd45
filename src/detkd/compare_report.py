"""Aggregate comparison runs into ``reports/kd_compare.{json,md,png}``.

Contract: ``build_report(records, step_times, tuning)`` is a pure function of the per-experiment records
(``detkd.compare.RunRecord``), the step-time breakdowns (``detkd.step_time``) and the tuning records
(``detkd.tune``); it computes, per family and method, AP mean / sample standard deviation over seeds, the
gain over the baseline student paired by seed with its 95 % confidence interval (Student's t over the
per-seed differences), the share of the teacher-student gap recovered (mean gain / (mean teacher AP -
mean baseline AP)), training seconds per iteration relative to the baseline, peak memory, what the sweep
tried and chose with each loss term's size, and checks the targets on every family. ``write_report``
writes JSON, Markdown and a bar chart atomically.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Optional

from detkd.io import atomic_path, atomic_write_json, atomic_write_text

OVERHEAD_TARGET = 0.10  # share of a baseline step a method may add beyond the teacher's forward
GAP_TARGET = 0.50  # share of the teacher-student gap the best method must recover
OVERHEAD_EXEMPT = ("drkd",)  # trains extra graph units; reported, not held to the target

# Published COCO box AP (student -> distilled) from the papers; "teacher" where stated.
PUBLISHED = {
    "fitnet": {"fasterrcnn": "R50 37.4 -> 40.1 (+2.7; R152 teacher 41.3; DeFeat's all-neck ablation)",
               "retinanet": "R50 36.5 -> 39.1 (+2.6; DeFeat's all-neck ablation)"},
    "dsig": {"fasterrcnn": "R18 33.06 -> 37.25 (+4.2; R50 teacher, 1x)",
             "retinanet": "R18 31.60 -> 34.72 (+3.1; R50 teacher, 1x)"},
    "drkd": {"fasterrcnn": "R50 38.4 -> 41.6 (+3.2; ResNeXt-101 teacher, 2x)",
             "retinanet": "R50 37.4 -> 40.3 (+2.9; X101 teacher 41.0, 2x)"},
    "gid": {"fasterrcnn": "R50 38.3 -> 40.2 (+1.9; R101 teacher 39.6, 2x)",
            "retinanet": "R50 36.2 -> 39.1 (+2.9; R101 teacher 38.1, 2x)"},
    "defeat": {"fasterrcnn": "R50 37.4 -> 40.9 (+3.5; R152 teacher 41.3, 1x)",
               "retinanet": "R50 36.5 -> 39.7 (+3.2; R152 teacher 40.5, 1x)"},
    "mar": {"fasterrcnn": "R50 37.4 -> 40.6 (+3.2; abstract only, unverified)", "retinanet": "n/a"},
}


# two-sided 95 % critical values of Student's t by degrees of freedom (n seeds - 1)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}


def t_critical(df: int) -> float:
    """Two-sided 95 % critical value of Student's t; for df between table rows, the next smaller df's
    (wider, so the interval never claims more than it has)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two seeds")
    return T_975[max(k for k in T_975 if k <= df)] if df <= 30 else 1.960


def confidence_interval(values: list[float]) -> Optional[tuple[float, float]]:
    """95 % interval of the mean of ``values`` (paired differences); None with fewer than two."""
    if len(values) < 2:
        return None
    mean, std = _mean_std(values)
    half = t_critical(len(values) - 1) * std / math.sqrt(len(values))
    return mean - half, mean + half


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list) -> dict:
    """One family's records -> {"baseline": {...}, "teacher_ap": x, "methods": {name: {...}}}."""
    per_seed_baseline = {r.seed: r for r in records}  # every experiment of a seed shares the baseline
    base_ap = [r.baseline_ap for r in per_seed_baseline.values()]
    base_mean, base_std = _mean_std(base_ap)
    teacher_ap = statistics.fmean(r.teacher_ap for r in records)
    base_sit = statistics.fmean(r.baseline_s_per_iter for r in per_seed_baseline.values())
    gap = teacher_ap - base_mean
    methods = {}
    by_method = defaultdict(list)
    for r in records:
        by_method[r.method].append(r)
    for method, rs in by_method.items():
        ap_mean, ap_std = _mean_std([r.distilled_ap for r in rs])
        gains = [r.distilled_ap - r.baseline_ap for r in sorted(rs, key=lambda r: r.seed)]
        gain_mean, gain_std = _mean_std(gains)
        s_per_iter = statistics.fmean(r.distill_s_per_iter for r in rs)
        methods[method] = {
            "seeds": sorted(r.seed for r in rs),
            "ap_mean": ap_mean, "ap_std": ap_std,
            "gain_mean": gain_mean, "gain_std": gain_std, "gains": gains,
            "gain_ci95": confidence_interval(gains),
            "gap_share": gain_mean / gap if gap > 0 else None,
            "seconds_per_iter": s_per_iter,
            "time_per_iter_vs_baseline": s_per_iter / base_sit,
            "peak_memory_mb": max(r.distill_peak_mb for r in rs),
        }
    return {
        "teacher_ap": teacher_ap,
        "baseline": {"seeds": sorted(per_seed_baseline), "ap_mean": base_mean, "ap_std": base_std,
                     "seconds_per_iter": base_sit,
                     "peak_memory_mb": max(r.baseline_peak_mb for r in per_seed_baseline.values())},
        "methods": methods,
    }


def check_targets(family_summary: dict) -> dict:
    """The issue's targets on one family: every method gains, the best recovers >= 50 % of the gap, and
    each method's step adds <= 10 % of a baseline step beyond the teacher's forward (DRKD exempt)."""
    methods = family_summary["methods"]
    raises = {m: s["gain_mean"] > 0 for m, s in methods.items()}
    shares = {m: s["gap_share"] for m, s in methods.items() if s["gap_share"] is not None}
    best = max(shares, key=shares.get) if shares else None
    overhead = {m: s["step"]["overhead_share_of_baseline"] <= OVERHEAD_TARGET
                for m, s in methods.items() if "step" in s and m not in OVERHEAD_EXEMPT}
    return {
        "every_method_raises_baseline": all(raises.values()), "raises": raises,
        "best_method": best, "best_gap_share": shares.get(best),
        "best_recovers_half_gap": bool(best and shares[best] >= GAP_TARGET),
        "overhead_within_target": overhead,
    }


def summarise_tuning(tuning: list[dict], family: str) -> dict:
    """One family's sweep: per method the dev AP at each scale, the chosen scale and weights, and the term
    sizes of the chosen run; plus the baseline's dev AP."""
    from detkd.tune import SCALES, choose, ordered_hparams

    recs = [r for r in tuning if r["family"] == family]
    chosen = {m: r for (f, m), r in choose(recs).items() if f == family}
    base = next((r for r in recs if r["method"] == "none"), None)
    methods = {}
    for method, best in chosen.items():
        runs = sorted((r for r in recs if r["method"] == method), key=lambda r: r["scale"])
        methods[method] = {"dev_ap": {f"{r['scale']:g}": r["dev_ap"] for r in runs},
                           "chosen_scale": best["scale"], "terms": best["terms"],
                           "chosen": ordered_hparams(method, family, best["hparams"]),
                           "seconds": sum(r["seconds"] for r in runs)}
    return {"scales": list(SCALES), "seed": recs[0]["seed"] if recs else None,
            "baseline_dev_ap": base["dev_ap"] if base else None, "methods": methods}


def build_report(records: list, step_times: list[dict], tuning: Optional[list[dict]] = None) -> dict:
    families = {}
    for family in dict.fromkeys(r.family for r in records):
        summary = summarise([r for r in records if r.family == family])
        for st in step_times:
            if st["family"] == family and st["method"] in summary["methods"]:
                summary["methods"][st["method"]]["step"] = {k: st[k] for k in (
                    "baseline_step", "teacher_forward", "distill_step", "overhead", "overhead_iqr",
                    "overhead_share_of_baseline", "iters", "device", "threads") if k in st}
                summary["methods"][st["method"]]["step"]["teacher_on_request"] = st.get("teacher_on_request", 0.0)
        if tuning:
            summary["tuning"] = summarise_tuning(tuning, family)
        summary["targets"] = check_targets(summary)
        families[family] = summary
    return {"families": families, "runs": [dict(vars(r)) for r in records], "published_coco": PUBLISHED}


def _fmt(x, spec=".3f", none="n/a") -> str:
    return none if x is None else format(x, spec)


def _ci(interval) -> str:
    return "n/a" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _terms(sizes: dict) -> str:
    """'name start -> end' per term, as multiples of the detector loss."""
    names = sorted(set(sizes.get("start", {})) | set(sizes.get("end", {})))
    return "; ".join(f"{n} {sizes['start'].get(n, 0):.2g} -> {sizes['end'].get(n, 0):.2g}" for n in names) or "n/a"


def render_markdown(report: dict) -> str:
    lines = ["# Distillation comparison", "",
             "Written by `make compare` (`python -m detkd.compare`). AP is COCO box AP on the val split; gain is "
             "paired by seed (the baseline and the distilled student of a seed share initialisation and data "
             "order), with the 95 % confidence interval of the mean paired gain (Student's t); gap share = mean "
             "gain / (teacher AP - mean baseline AP). Every method's loss weights were chosen with the same "
             "budget on the dev split, never on val (see \"How the weights were chosen\").", ""]
    for family, fam in report["families"].items():
        base = fam["baseline"]
        lines += [f"## {family}", "",
                  f"Teacher AP {fam['teacher_ap']:.3f}; baseline student AP {base['ap_mean']:.3f} ± "
                  f"{base['ap_std']:.3f} over seeds {base['seeds']} ({base['seconds_per_iter']:.3f} s/it, "
                  f"peak memory {base['peak_memory_mb']:.0f} MB).", "",
                  "| method | seeds | AP mean ± std | gain (95 % CI) | gap share | s/it vs baseline | peak MB | "
                  "baseline step ms | teacher ms (own forward + on request) | distill step ms | added ms (% of baseline step) | published COCO |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ranked = sorted(fam["methods"].items(), key=lambda kv: -kv[1]["gain_mean"])
        for method, m in ranked:
            st = m.get("step")
            step_cols = (f"{st['baseline_step'] * 1e3:.0f} | {st['teacher_forward'] * 1e3:.0f} + "
                         f"{st['teacher_on_request'] * 1e3:.0f} | "
                         f"{st['distill_step'] * 1e3:.0f} | {st['overhead'] * 1e3:.0f} "
                         f"({st['overhead_share_of_baseline']:+.0%})") if st else "n/a | n/a | n/a | n/a"
            lines.append(
                f"| {method} | {len(m['seeds'])} | {m['ap_mean']:.3f} ± {m['ap_std']:.3f} | {m['gain_mean']:+.3f} "
                f"{_ci(m.get('gain_ci95'))} | {_fmt(m['gap_share'], '.0%')} | {m['time_per_iter_vs_baseline']:.2f}x | "
                f"{m['peak_memory_mb']:.0f} | {step_cols} | {report['published_coco'].get(method, {}).get(family, 'n/a')} |")
        lines.append("")
        lines += _targets_lines(fam["targets"])
        if fam.get("tuning"):
            lines += _tuning_lines(fam["tuning"])
    step = next((m["step"] for f in report["families"].values() for m in f["methods"].values() if "step" in m), None)
    if step:
        lines += [f"Step times: median of {step['iters']} steps on {step['device']} with {step['threads']} threads, "
                  "the parts interleaved on the same batches (`detkd.step_time`). Teacher time is its own forward plus "
                  "the passes a method asks of it (its RoI head on the method's boxes, proposals, towers), timed "
                  "where they run; added = distill step - baseline step - teacher time, the median of that difference over "
                  "the batches (each batch's parts timed back to back). Training s/it and peak "
                  "memory come from the experiments' own training stages.", ""]
    return "\n".join(lines)


def _targets_lines(t: dict) -> list[str]:
    def yes(ok) -> str:
        return "yes" if ok else "no"

    not_raising = [m for m, ok in t["raises"].items() if not ok]
    overhead = ", ".join(f"{m}: {yes(ok)}" for m, ok in t["overhead_within_target"].items()) or "not timed"
    return ["Targets:", "",
            f"- every method raises the baseline's mean AP: **{yes(t['every_method_raises_baseline'])}**"
            + (f" (does not: {', '.join(not_raising)})" if not_raising else ""),
            f"- best method recovers >= {GAP_TARGET:.0%} of the gap: **{yes(t['best_recovers_half_gap'])}** "
            + (f"({t['best_method']}: {_fmt(t['best_gap_share'], '.0%')})" if t["best_method"] else
               "(no gap to recover: the teacher is not above the baseline)"),
            f"- added step time <= {OVERHEAD_TARGET:.0%} of a baseline step (DRKD exempt): {overhead}", ""]


def _tuning_lines(tuning: dict) -> list[str]:
    scales = [f"{s:g}" for s in tuning["scales"]]
    lines = ["How the weights were chosen: each method's loss weights, all together, at "
             + ", ".join(f"{s}x" for s in scales) + " their published values (the same three runs for every "
             f"method), student seed {tuning['seed']}, trained on the fit split (train without dev) and scored "
             f"on the dev split; baseline student dev AP {_fmt(tuning['baseline_dev_ap'])}. The best dev AP "
             "chose the weights now in params.yaml. Term sizes are each distillation term over the detector "
             "loss, averaged over the first and the last five logged rows (50 steps at log_every 10) of the chosen run.", "",
             "| method | dev AP at " + " / ".join(f"{s}x" for s in scales) + " | chosen | weights | term sizes (start -> end) |",
             "|---|---|---|---|---|"]
    for method, m in tuning["methods"].items():
        aps = " / ".join(_fmt(m["dev_ap"].get(s)) for s in scales)
        weights = ", ".join(f"{k} {v:g}" for k, v in m["chosen"].items() if isinstance(v, float))
        lines.append(f"| {method} | {aps} | {m['chosen_scale']:g}x | {weights} | {_terms(m['terms'])} |")
    return lines + [""]


def plot_report(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(report["families"].items())
    fig, axes = plt.subplots(1, len(fams), figsize=(6 * len(fams), 4), squeeze=False)
    for ax, (family, fam) in zip(axes[0], fams):
        names = ["baseline", *fam["methods"]]
        means = [fam["baseline"]["ap_mean"], *[m["ap_mean"] for m in fam["methods"].values()]]
        stds = [fam["baseline"]["ap_std"], *[m["ap_std"] for m in fam["methods"].values()]]
        ax.bar(names, means, yerr=stds, capsize=4, color=["grey"] + ["tab:blue"] * (len(names) - 1))
        ax.axhline(fam["teacher_ap"], color="tab:red", linestyle="--", label=f"teacher {fam['teacher_ap']:.3f}")
        ax.set_title(f"{family}: COCO AP (mean ± std over seeds)")
        ax.set_ylabel("AP")
        ax.legend(loc="lower right")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict, out: str) -> None:
    atomic_write_json(f"{out}.json", report)
    atomic_write_text(f"{out}.md", render_markdown(report))
    plot_report(report, f"{out}.png")
