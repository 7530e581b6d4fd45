"""Distillation methods. Importing this package fills ``METHODS`` (name -> class)."""

from detkd.distill import defeat, drkd, dsig, fitnet, gid, mar, none  # noqa: F401  (registration side effects)
from detkd.distill.base import METHODS, DistillInputs, DistillMethod, build_method  # noqa: F401
