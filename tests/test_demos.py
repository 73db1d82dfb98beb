"""The notebooks in ``demos/`` execute top to bottom, offline, and draw their figures.

Each notebook runs in a fresh kernel of the Python that runs the tests (a kernelspec written to a temporary
folder, so no user or system kernelspec is needed or touched), with ``TL_DEGENERACY_OFFLINE=1`` (the bundled
model and data) and the Hugging Face hub switched off. Torch in the kernel uses one thread unless
``OMP_NUM_THREADS`` says otherwise: the bundled model is too small to gain from more, and on a busy shared
CPU two threads ran the SGLD cells several times slower than one. Deselect with ``-m "not demos"``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from ipykernel.kernelspec import write_kernel_spec  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

DEMOS = Path(__file__).resolve().parents[1] / "demos"
NOTEBOOKS = sorted(DEMOS.glob("*.ipynb"))
KERNEL_NAME = "tl-degeneracy-demos"
#: seconds one cell may take before the run fails (the notebooks take about a minute each in all)
CELL_TIMEOUT = 600

pytestmark = pytest.mark.demos


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A kernelspec that starts ``sys.executable -m ipykernel_launcher``, in a folder of its own."""
    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(path=str(root / KERNEL_NAME))
    return [str(root)]


def test_demos_folder_holds_the_three_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"Quickstart.ipynb", "Behavioral_LLC.ipynb", "Sweeps.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_offline_and_draws_figures(
    path: Path, kernel_dirs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel inherits this environment: offline switches, torch threads, no forced non-interactive
    # backend (the notebooks select the inline backend), and this environment's scripts (tl-degeneracy) on PATH.
    monkeypatch.setenv("TL_DEGENERACY_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.delenv("TL_DEGENERACY_DEMO_MODEL", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    seconds = time.perf_counter() - start

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{path.name} drew no figure (no image/png output)"
    print(f"{path.name}: {seconds:.1f} s, {len(images)} figures")
