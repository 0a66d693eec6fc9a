"""The Colab notebook (launch/colab_tpu_demo.ipynb) runs top to bottom in a fresh kernel on CPU.

The notebook is executed headless with nbclient, with a cell injected right after its
`parameters` cell that shrinks it to the `tiny` size, 2 steps per stage and 4 evaluation records.
The kernel gets one CPU device: the test process forces 8 (conftest), the notebook must not.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_tpu_demo.ipynb"
# `python`, `python3` and `python3.X` in a kernelspec's argv are replaced by sys.executable.
SELF_NAMES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}


def _load() -> "nbformat.NotebookNode":
    return nbformat.read(NOTEBOOK, as_version=4)


def _runs_this_python(argv: list[str]) -> bool:
    if not argv:
        return False
    if argv[0] in SELF_NAMES:
        return True
    try:
        return os.path.samefile(argv[0], sys.executable)
    except OSError:
        return False


def use_this_python(tmp_path: Path, monkeypatch) -> None:
    """Makes the kernelspec `python3` run this interpreter: the installed one when it does, else one
    written to `tmp_path` and put first on JUPYTER_PATH (nothing is installed anywhere)."""
    try:
        if _runs_this_python(KernelSpecManager().get_kernel_spec("python3").argv):
            return
    except NoSuchKernel:
        pass
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH")])))
    assert _runs_this_python(KernelSpecManager().get_kernel_spec("python3").argv)


def kernel_env() -> dict[str, str]:
    """This process's environment with one CPU device for JAX (no forced device count)."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _outputs(nb) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")


def test_notebook_is_committed_clean():
    nb = _load()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("SIZE", "STEPS", "WORKDIR", "CHECKPOINT", "EVAL_RECORDS"):
        assert re.search(rf"^{name} = ", tagged[0].source, re.M), name


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    nb = _load()
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(
        f'SIZE = "tiny"\nSTEPS = {{"warmup": 2, 1: 2, 2: 2, 3: 2}}\nEVAL_RECORDS = 4\nWORKDIR = {str(tmp_path / "run")!r}',
        id="injected-parameters",
    )
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)

    use_this_python(tmp_path, monkeypatch)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute(env=kernel_env())  # raises CellExecutionError naming the cell that failed

    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "expected the grounding, referring and photo pictures"
    devices = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "CpuDevice(id=0)" in devices and "id=1" not in devices, devices[:500]

    logs = "".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert "[warmup] step 2/2" in logs and "[llm warmup] step 2/2" in logs and (tmp_path / "run" / "warmup" / "backbones.json").is_file()
    for stage in (1, 2, 3):
        assert f"[stage {stage}] step 2/2" in logs
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    printed = _stdout(last)
    assert re.search(r"^acc50\s+\S", printed, re.M) and re.search(r"^accuracy\s+\S", printed, re.M), printed
    for task in ("synthetic_grounding", "synthetic_referring"):
        metrics = json.loads((tmp_path / "run" / "eval" / task / "metrics.json").read_text())
        assert metrics["n_records"] == 4 and metrics["n_failed"] == 0
    assert (tmp_path / "run" / "stage3" / "tokenizer.model").is_file()
