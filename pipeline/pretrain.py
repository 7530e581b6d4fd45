"""Stage ``pretrain``: train the teacher's and the student's backbones as classifiers of generated
one-object images (``detkd.pretrain``), the default data's stand-in for ImageNet weights.

Reads params: seed, data (the generator), pretrain, teacher.backbone(_weights), student.backbone(_weights).
Writes: ``<out>/<role>_backbone.pt`` for each role pretrained and ``<out>/pretrain.json`` (which role has
which file; written last), and ``--metrics`` (held-out accuracy and seconds per role). With
``pretrain.enabled: false``, or for a role that names its own ``backbone_weights``, no file is made and the
training stages start that role as configured.
"""

import argparse
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import run_main
from detkd.config import load_params
from detkd.io import atomic_torch_save, atomic_write_json
from detkd.pretrain import MANIFEST, check_pretrain_source, pretrain_backbone, roles_to_pretrain
from detkd.tracking.mlflow_run import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="models/pretrained")
    parser.add_argument("--metrics", default=None, help="JSON: held-out accuracy and seconds per role (DVC metrics)")
    args = parser.parse_args()

    params = load_params(args.params)
    check_pretrain_source(params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logged = {"seed": params.seed, "pretrain": params.pretrain.model_dump(),
              "teacher.backbone": params.teacher.backbone, "student.backbone": params.student.backbone}
    with stage_run("pretrain", logged) as run:
        roles, metrics = {}, {}
        for role in roles_to_pretrain(params):
            backbone = getattr(params, role).backbone
            state, report = pretrain_backbone(backbone, params.pretrain, params.data.synthetic, params.seed,
                                              description=f"pretrain {role}")
            atomic_torch_save(out / f"{role}_backbone.pt", state)
            roles[role] = {"file": f"{role}_backbone.pt", **report}
            metrics[role] = {"held_out_accuracy": report["held_out_accuracy"], "seconds": report["seconds"]}
            run.log_metrics({f"{role}.{k}": v for k, v in metrics[role].items()})
            print(f"pretrain: {role} {backbone}: held-out accuracy {report['held_out_accuracy']:.3f} "
                  f"({report['seconds']:.0f} s) -> {out / roles[role]['file']}")
        atomic_write_json(out / MANIFEST, {"enabled": params.pretrain.enabled, "roles": roles})
        if args.metrics:
            atomic_write_json(args.metrics, metrics)
        if not roles:
            print("pretrain: nothing to pretrain (pretrain.enabled is false, or both roles name backbone_weights)")


if __name__ == "__main__":
    run_main(main)
