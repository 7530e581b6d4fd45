"""Every shell command in the READMEs' ```bash blocks is checked, so the docs cannot drift silently from the code:
make targets by a dry run (`make -n`), Python entries by parsing the documented arguments up to `--help`
(appended last: argparse checks every option value it reads before it meets `--help`), `-S key=value`
overrides of `dvc exp run` by validating params.yaml with them, files that `cat` shows by their existence.
A program the test does not know fails it, so a new kind of command gets a check when it is documented."""

import re
import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from detkd.config import deep_merge, parse_params

DOCS = ("README.md", "deploy/README.md", "docs/methods.md")
NOT_RUN_HERE = {"docker": "needs a Docker daemon", "source": "changes the calling shell only",
                "perf_analyzer": "ships in Triton's SDK container"}


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every command line of every ```bash block, continuation lines joined."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                if line:
                    found.append((doc, line))
    return found


def _override(raw: dict, assignment: str) -> dict:
    key, _, value = assignment.partition("=")
    nested: dict = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)
    return deep_merge(raw, nested)


def _python_entry(args: list[str]) -> list[str]:
    """A Python command with `--help` appended and placeholders (`IMAGES...`) dropped."""
    return [sys.executable, *[a for a in args if not a.endswith("...")], "--help"]


def check(command: str) -> None:
    words = shlex.split(command.replace("$PWD", str(REPO)))
    program = words[0]
    if program in NOT_RUN_HERE:
        return
    if program == "make":
        target = [w for w in words[1:] if "=" not in w]
        proc = subprocess.run(["make", "-n", *target], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr.strip()}"
        for assignment in (w for w in words[1:] if w.startswith("COMPARE_ARGS=")):
            proc = subprocess.run(_python_entry(["-m", "detkd.compare", *shlex.split(assignment.split("=", 1)[1])]),
                                  cwd=REPO, capture_output=True, text=True)
            assert proc.returncode == 0, f"{command}: {proc.stderr.strip()}"
        return
    if program == "dvc":
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        assignments = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
        for assignment in assignments:
            raw = _override(raw, assignment)
        parse_params(raw, f"params.yaml with {' '.join(assignments)}")  # a bad key or value raises ConfigError
        sub = [w for w in words[1:] if not w.startswith("-") and "=" not in w][:2]
        proc = subprocess.run([sys.executable, "-m", "dvc", *sub, "--help"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr.strip()}"
        return
    if program in ("python", "torchrun"):
        args = words[1:]
        if program == "torchrun":
            args = args[next(i for i, a in enumerate(args) if a.endswith(".py")):]
        proc = subprocess.run(_python_entry(args), cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr.strip()[-500:]}"
        return
    if program == "mlflow":
        proc = subprocess.run([sys.executable, "-m", "mlflow", *words[1:], "--help"], cwd=REPO, capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr.strip()[-500:]}"
        return
    if program == "cat":
        for path in words[1:]:
            assert (REPO / path).is_file(), f"{command}: {path} is not in the repository"
        return
    pytest.fail(f"{command}: no check for '{program}'; add one to tests/test_readme_commands.py")


@pytest.mark.parametrize("doc, command", documented_commands(), ids=lambda v: v[:60])
def test_documented_command_parses(doc, command):
    check(command)


def test_the_check_catches_drift():
    with pytest.raises(AssertionError):
        check("make no-such-target")
    with pytest.raises(AssertionError):
        check("python deploy/infer.py --model m.onnx --backend no-such-runtime x.png")
    with pytest.raises(Exception, match="distill.method"):
        check("dvc exp run -S distill.method=no-such-method")
    with pytest.raises(pytest.fail.Exception):
        check("curl https://example.com")
