"""Equal-budget choice of every method's loss weights on the dev split: ``make compare``'s first phase.

Contract: for each family and method, the distilled student is trained on the ``fit`` split (train without
dev) with the method's loss weights (``family_weight_keys``, all together) at each factor in ``SCALES`` times
their published values for that family, one seed (``TUNE_SEED``), the comparison's teacher and the
``train_student`` schedule; each run is scored by COCO AP on the ``dev`` split. The factor with the best
dev AP is chosen. The val split, which the comparison reports, is never read here. Every method gets the
same three runs; nothing else about a method is tuned (its size-dependent settings follow the 800 -> 128 px
rule and come from params.yaml; a weight params set to 0 is a switched-off term and stays 0).

Each run (``TunePoint``) writes one JSON record (dev AP, the weights, the seconds, and each loss term's
size relative to the detector loss at the start and the end of training), so an interrupted sweep resumes.
``choose`` picks per method; ``apply_choice`` writes the chosen weights into ``params.yaml`` in place
(the line of ``distill.<family>.<method>``; comments and layout kept).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from detkd.errors import ConfigError, DetkdError

SCALES = (0.01, 0.1, 1.0)  # times the published weights
TUNE_SEED = 0
SHORT = {"fasterrcnn": "frcnn", "retinanet": "retina"}
EDGE_ROWS = 5  # logged rows averaged for a term's size at the start / end of training


@dataclass(frozen=True)
class TunePoint:
    """One tuning run: ``method`` "none" is the baseline student on the fit split (the dev reference)."""

    family: str
    method: str
    scale: float = 1.0

    @property
    def name(self) -> str:
        return f"tune-{SHORT[self.family]}-{self.method}" + ("" if self.method == "none" else f"-x{self.scale:g}")


def tune_plan(families: list[str], methods: list[str]) -> list[TunePoint]:
    """Per family: the baseline, then every method at every scale."""
    return [p for f in families for p in [TunePoint(f, "none"), *(TunePoint(f, m, s) for m in methods for s in SCALES)]]


def swept_hparams(method: str, family: str, configured: dict, scale: float) -> dict:
    """The hyper-parameters of one tuning run: ``configured`` (params) for the non-weight settings, every
    loss weight at ``scale`` x its published value, except weights configured as 0 (switched off)."""
    from detkd.distill.base import METHODS, published

    cls, base = METHODS[method], published(method, family)
    swept = cls.family_weight_keys(family)
    out = {k: v for k, v in configured.items() if k not in cls.weight_keys}  # weights the family ignores drop out
    for key in swept:
        out[key] = 0.0 if configured.get(key) == 0 else _round(base[key] * scale)
    return ordered_hparams(method, family, out)


def ordered_hparams(method: str, family: str, hparams: dict) -> dict:
    """``hparams`` in the method constructor's order (as a reader of params.yaml expects; records are JSON
    with sorted keys); unknown keys last."""
    from detkd.distill.base import published

    order = list(published(method, family))
    return dict(sorted(hparams.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _round(x: float) -> float:
    """Drop binary noise (0.1 * 3.0 -> 0.3): 6 significant digits."""
    return float(f"{x:.6g}")


def term_sizes(history: list[dict]) -> dict:
    """Each ``distill/*`` term relative to the detector loss (sum of ``task/*``), averaged over the first and
    the last ``EDGE_ROWS`` logged rows: {"start": {term: ratio}, "end": {...}}."""
    if not history:
        return {"start": {}, "end": {}}

    def ratios(rows: list[dict]) -> dict:
        task = statistics.fmean(sum(v for k, v in r.items() if k.startswith("task/")) for r in rows)
        terms = sorted({k for r in rows for k in r if k.startswith("distill/")})
        return {k.removeprefix("distill/"): statistics.fmean(r.get(k, 0.0) for r in rows) / task for k in terms}

    return {"start": ratios(history[:EDGE_ROWS]), "end": ratios(history[-EDGE_ROWS:])}


def choose(records: list[dict]) -> dict:
    """(family, method) -> the record with the best dev AP (ties: the smaller scale, the gentler change)."""
    best: dict = {}
    for r in sorted(records, key=lambda r: r["scale"]):
        if r["method"] == "none":
            continue
        key = (r["family"], r["method"])
        if key not in best or r["dev_ap"] > best[key]["dev_ap"]:
            best[key] = r
    return best


# ---- writing the choice into params.yaml ------------------------------------------------------------

def yaml_float(x: float) -> str:
    """``x`` as YAML 1.1 (PyYAML) reads back as a float: ``5e-05`` would be a string, ``5.0e-05`` is not."""
    text = repr(float(x))
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text


def _flow(values: dict) -> str:
    def fmt(v):
        return ("true" if v else "false") if isinstance(v, bool) else (yaml_float(v) if isinstance(v, float) else str(v))

    return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in values.items()) + "}"


def _locate(lines: list[str], family: str, method: str, path: Path) -> tuple[int, re.Match]:
    """Line index and regex match of ``<method>: {...}`` under ``distill: -> <family>:``; a layout that
    cannot be edited safely is a ``ConfigError`` naming the line."""
    section = _find_line(lines, r"distill:", 0, 0, path)
    fam = _find_line(lines, rf"{family}:", section + 1, 2, path)
    row = _find_line(lines, rf"{method}:", fam + 1, 4, path)
    match = re.match(r"^(\s*\w+:\s*)(\{[^}]*\})(\s*(#.*)?)$", lines[row].rstrip("\n"))
    if not match:
        raise ConfigError(f"{path}:{row + 1}: distill.{family}.{method} must be a one-line {{...}} mapping to be "
                          "updated by make compare")
    return row, match


def check_editable(params_path: str | Path, family: str, method: str) -> None:
    """Raise the ``ConfigError`` that ``apply_choice`` would, before hours of tuning are spent."""
    path = Path(params_path)
    _locate(path.read_text(encoding="utf-8").splitlines(keepends=True), family, method, path)


def apply_choice(params_path: str | Path, family: str, method: str, hparams: dict) -> bool:
    """Replace the mapping on the line ``<method>: {...}`` under ``distill: -> <family>:`` of
    ``params_path`` with ``hparams`` (a trailing comment is kept; the file is replaced atomically).
    Returns whether the file changed. A layout it cannot edit safely is a ``ConfigError``."""
    import yaml

    from detkd.io import atomic_write_text

    path = Path(params_path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    row, match = _locate(lines, family, method, path)
    new = f"{match.group(1)}{_flow(hparams)}{match.group(3)}\n"
    if new == lines[row]:
        return False
    lines[row] = new
    text = "".join(lines)
    if (yaml.safe_load(text)["distill"][family][method] or {}) != hparams:  # the edit must mean what it says
        raise ConfigError(f"{path}:{row + 1}: could not write distill.{family}.{method} safely")
    atomic_write_text(path, text)
    return True


def _find_line(lines: list[str], key_pattern: str, start: int, indent: int, path: Path) -> int:
    """Index of the first line at ``indent`` spaces matching ``key_pattern`` before the block (``indent - 2``)
    that contains it ends."""
    for i in range(start, len(lines)):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = len(line) - len(line.lstrip(" "))
        if depth < indent:
            break
        if depth == indent and re.match(rf"^\s*{key_pattern}", line):
            return i
    raise ConfigError(f"{path}: no '{key_pattern.rstrip(':')}' key at indent {indent} where make compare expects it "
                      "(distill.<family>.<method>)")


# ---- one run --------------------------------------------------------------------------------------------

def point_params(params, point: TunePoint):
    """``params`` as one tuning run sees them: its family, method, swept weights and the tuning seed."""
    from detkd.config import parse_params, deep_merge

    raw = params.model_dump()
    override = {"model": {"family": point.family}, "distill": {"method": point.method},
                "train_student": {"seed": TUNE_SEED}}
    if point.method != "none":
        configured = getattr(params.distill, point.family).model_dump()[point.method]
        hparams = swept_hparams(point.method, point.family, configured, point.scale)
        raw["distill"][point.family][point.method] = hparams
    return parse_params(deep_merge(raw, override), f"tuning run {point.name}")


def run_point(params, point: TunePoint, data_dir: str | Path, teacher: Optional[str | Path], work: str | Path,
              key: str = "", pretrained_dir: Optional[str | Path] = None) -> dict:
    """Train ``point``'s student on fit, score it on dev; return (and write ``<work>/<name>.json``) its record.
    ``key`` (the caller's digest of the settings) is stored so a stale record can be recognised."""
    import torch

    from detkd.data.dataset import open_split
    from detkd.evaluation.report import evaluate_checkpoint
    from detkd.io import atomic_write_json
    from detkd.training import train_detector

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    p = point_params(params, point)
    checkpoint = work / f"{point.name}.pt"
    result = train_detector(p, "student", data_dir, checkpoint, work / f"{point.name}.state",
                            teacher_path=None if point.method == "none" else teacher, split="fit",
                            pretrained_dir=pretrained_dir)
    dev = open_split(data_dir, "dev", p.data.min_box_size)
    metrics = evaluate_checkpoint(checkpoint, dev, p.eval.batch_size, torch.device("cpu"))["metrics"]
    record = {"family": point.family, "method": point.method, "scale": point.scale, "name": point.name,
              "hparams": p.distill.hparams(point.family) if point.method != "none" else {},
              "dev_ap": metrics["AP"], "dev_ap50": metrics["AP50"], "seconds": round(result.seconds, 1),
              "seconds_per_iter": result.seconds_per_iter, "seed": TUNE_SEED, "terms": term_sizes(result.history), "key": key}
    atomic_write_json(work / f"{point.name}.json", record)
    checkpoint.unlink(missing_ok=True)  # the record is what the sweep keeps; the weights are not shipped
    return record


def main(argv: Optional[list[str]] = None) -> None:
    """One tuning run as its own process (``make compare`` runs several at a time, each with its threads)."""
    from detkd.config import FAMILIES, load_params

    parser = argparse.ArgumentParser(prog="python -m detkd.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (not needed for --method none)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--work", default=".dvc/tmp/compare")
    parser.add_argument("--key", default="", help="settings digest stored in the record (make compare's)")
    parser.add_argument("--pretrained", default=None, help="the pretrain stage's directory (student backbone init)")
    args = parser.parse_args(argv)
    if not math.isfinite(args.scale) or args.scale < 0:
        raise DetkdError(f"--scale must be a finite number >= 0, got {args.scale}")
    if args.method != "none" and not args.teacher:
        raise DetkdError(f"--teacher is needed to tune {args.method}")
    record = run_point(load_params(args.params), TunePoint(args.family, args.method, args.scale), args.data,
                       args.teacher, args.work, args.key, args.pretrained)
    print(f"tune: {record['name']}: dev AP {record['dev_ap']:.4f} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    from detkd.cli import run_main

    run_main(main)
