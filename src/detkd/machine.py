"""What a stage ran on: the CPU's name, the device training uses and the versions of the libraries that
decide its numbers (recorded in MLflow for every stage and in the benchmark report)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "nvidia-modelopt", "tensorrt", "mlflow", "dvc")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """``cuda: <GPU>`` when CUDA is available (what training and evaluation then use), else ``cpu: <CPU>``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def library_versions() -> dict[str, str]:
    """Installed versions of ``LIBRARIES`` (absent ones are left out) and Python's."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment_tags() -> dict[str, str]:
    """MLflow tags: ``detkd.device``, ``detkd.platform`` and ``detkd.version.<library>``."""
    tags = {"detkd.device": device_name(), "detkd.platform": f"{platform.platform()} ({sys.implementation.name})"}
    tags.update({f"detkd.version.{k}": v for k, v in library_versions().items()})
    return tags
