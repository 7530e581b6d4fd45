"""A runner that sends the export contract to a Triton Inference Server (or any server speaking the KServe v2
HTTP/REST inference protocol, which Triton implements) and reads the four outputs back.

Contract: ``TritonHTTPRunner(url, model_name, contract)`` where ``contract`` is the exported ``.onnx`` file (or
an engine's ``.engine.json``) that was deployed: its metadata gives the input size, the letterbox rule and the
class names, so ``detect()`` letterboxes and maps boxes back exactly as the local runners do. ``infer(batch)``
POSTs ``{"inputs": [{"name": "images", "datatype": "FP32", "shape": [N, 3, S, S], "data": [...]}]}`` to
``<url>/v2/models/<model_name>/infer``. The standard library does the HTTP; a server that does not answer or
answers with an error is a one-line ``ModelFileError`` naming the URL.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from detkd.errors import ModelFileError
from detkd.runtime.base import Runner
from detkd.runtime.metadata import read_model_info
from detkd.runtime.onnx_runner import OUTPUTS

DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "FP16": np.float16}


class TritonHTTPRunner(Runner):
    backend = "triton-http"

    def __init__(self, url: str, model_name: str, contract: str | Path, timeout: float = 30.0,
                 max_batch: int | None = None):
        super().__init__(Path(contract), read_model_info(contract))
        self.url = url if "://" in url else f"http://{url}"
        self.model_name, self.timeout, self.max_batch = model_name, timeout, max_batch

    def _run(self, batch: np.ndarray):
        endpoint = f"{self.url.rstrip('/')}/v2/models/{self.model_name}/infer"
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(batch.shape),
                            "data": batch.reshape(-1).tolist()}],
                "outputs": [{"name": name} for name in OUTPUTS]}
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()[:200]
            raise ModelFileError(f"{endpoint}: the server answered {exc.code} ({detail})") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ModelFileError(f"{endpoint}: no usable answer ({getattr(exc, 'reason', exc)}); is the server up "
                                 f"and the model '{self.model_name}' loaded?") from None
        outputs = {o.get("name"): o for o in answer.get("outputs", [])}
        missing = [name for name in OUTPUTS if name not in outputs]
        if missing:
            raise ModelFileError(f"{endpoint}: the answer lacks the outputs {missing} of the export contract")
        return tuple(np.asarray(outputs[name]["data"], dtype=DTYPES.get(outputs[name].get("datatype"), np.float32))
                     .reshape(outputs[name]["shape"]) for name in OUTPUTS)
