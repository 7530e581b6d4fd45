"""deploy/triton_client.py against a real HTTP server on loopback that speaks the KServe v2 inference protocol
(the subset Triton's HTTP endpoint uses for detkd's models) and runs the ONNX file with onnxruntime: the
client's detections equal the local runner's; a server that is gone is one line."""

import json
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, free_port
from detkd.export.onnx_export import export_onnx
from detkd.runtime.onnx_runner import OnnxRunner
from detkd.runtime.preprocess import read_image
from test_export import tiny_detector, tiny_info

SERVER = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import numpy as np
    from detkd.runtime.onnx_runner import OnnxRunner, OUTPUTS
    runner = OnnxRunner(sys.argv[2])
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/v2/models/" + sys.argv[3] + "/infer":
                self.send_response(404); self.end_headers(); self.wfile.write(b'{"error": "unknown model"}'); return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            (inp,) = body["inputs"]
            batch = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
            out = runner.infer(batch)
            kinds = {"float32": "FP32", "int64": "INT64"}
            answer = {"outputs": [{"name": n, "datatype": kinds[str(a.dtype)], "shape": list(a.shape),
                                   "data": a.reshape(-1).tolist()} for n, a in zip(OUTPUTS, out)]}
            data = json.dumps(answer).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
        def log_message(self, *args): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
''')


@pytest.fixture
def served(tmp_path):
    model = tiny_detector("fasterrcnn")
    path = tmp_path / "tiny.onnx"
    export_onnx(model, tiny_info(model), path)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(path), "detkd_tiny"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield path, port, server
    server.kill()
    server.wait()


def _client(*args):
    return subprocess.run([sys.executable, str(REPO / "deploy/triton_client.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_the_triton_client_gets_the_local_runners_detections(served, tmp_path):
    path, port, _ = served
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 70), (64, 64)]):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images[-1])
    proc = _client("--url", f"127.0.0.1:{port}", "--name", "detkd_tiny", "--contract", str(path), *map(str, images))
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    local = OnnxRunner(path).detect([read_image(p) for p in images], batch_size=1)
    for image, expected in zip(images, local):
        got = remote[str(image)]
        assert len(got) == len(expected["scores"])
        for row, box, score, name in zip(got, expected["boxes"], expected["scores"], expected["class_names"]):
            assert row["class_name"] == name and row["score"] == pytest.approx(float(score), abs=1e-4)
            assert row["box"] == pytest.approx([float(v) for v in box], abs=0.01)


@pytest.mark.fault
def test_a_wrong_model_name_or_a_dead_server_is_one_line(served):
    path, port, server = served
    proc = _client("--url", f"127.0.0.1:{port}", "--name", "no_such_model", "--contract", str(path), str(path))
    # the image argument is the ONNX file itself: it is refused first, in one line
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    image = path.parent / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    proc = _client("--url", f"127.0.0.1:{port}", "--name", "no_such_model", "--contract", str(path), str(image))
    assert proc.returncode == 2 and "answered 404" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    server.kill()
    server.wait()
    proc = _client("--url", f"127.0.0.1:{port}", "--name", "detkd_tiny", "--contract", str(path), str(image))
    assert proc.returncode == 2 and "is the server up" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
