"""Issue 17: bundled package data, ``python -m``, the default thread count, DimCurve, PCA files without C_pinv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tl_degeneracy as tld
from tl_degeneracy._io import save_tensors, tensors_checksum
from tl_degeneracy.run.cli import default_threads, usable_cpus

REPO = Path(__file__).resolve().parents[1]


def test_bundled_files_are_package_data():
    """The model and token files live inside the package, where a wheel carries them."""
    if os.environ.get("TL_DEGENERACY_DATA"):
        pytest.skip("TL_DEGENERACY_DATA points elsewhere")
    pkg = Path(tld.__file__).resolve().parent
    assert tld.bundled_model_path().resolve() == pkg / "bundled" / "stdlib-gpt2"
    assert tld.bundled_data_path().resolve() == pkg / "bundled" / "stdlib-heldout.safetensors"
    assert tld.bundled_data_path().is_file()


def test_package_data_patterns_cover_every_bundled_file():
    """pyproject's package-data globs match every file the code needs (all but the training plot)."""
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    pkg = REPO / "tl_degeneracy"
    matched = {p for pat in patterns["tl_degeneracy"] for p in pkg.glob(pat)}
    needed = {p for p in (pkg / "bundled").rglob("*") if p.is_file() and p.suffix != ".png"}
    assert needed and needed <= matched, sorted(str(p) for p in needed - matched)


def test_data_dir_follows_the_environment_variable(tmp_path):
    code = "import tl_degeneracy as tld; print(tld.data.DATA_DIR)"
    env = {**os.environ, "TL_DEGENERACY_DATA": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == tmp_path
    env["TL_DEGENERACY_DATA"] = str(tmp_path / "nowhere")
    code = "import tl_degeneracy as tld; tld.bundled_model_path()"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "TL_DEGENERACY_DATA" in out.stderr


def test_python_dash_m_is_the_command():
    out = subprocess.run([sys.executable, "-m", "tl_degeneracy", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout


def test_default_threads_never_exceed_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = default_threads()
    assert 1 <= n <= len(usable_cpus())
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert usable_cpus() == [0] and default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def _basis():
    G = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    M = torch.diag(torch.tensor([1.0, 9.0, 5.0], dtype=torch.float64))
    return G, M


def test_dim_curve_is_a_named_pair_with_a_readable_repr():
    G, M = _basis()
    ib = tld.interaction_basis(G, M)  # Λ = 9, 4
    curve = ib.dim_curve(torch.tensor([0.0, 5.0, 10.0]))
    eps, dims = curve  # existing callers unpack it
    assert isinstance(curve, tld.DimCurve) and curve[1] is dims and curve.dims.tolist() == [2, 1, 0]
    assert repr(curve) == "DimCurve(3 points: eps 0 → 10, dim 2 → 0)"
    assert "tensor" not in repr(ib.dim_curve())
    assert repr(ib.dim_curve(torch.zeros(0))) == "DimCurve(0 points)"


def test_to_dataframe():
    pd = pytest.importorskip("pandas")
    G, M = _basis()
    ib = tld.interaction_basis(G, M)
    df = ib.dim_curve(torch.tensor([0.0, 5.0])).to_dataframe()
    assert isinstance(df, pd.DataFrame) and df["dim"].tolist() == [2, 1] and df["eps"].tolist() == [0.0, 5.0]
    spec = ib.to_dataframe()
    assert spec["lambda"].tolist()[:2] == [9.0, 4.0] and spec["kept"].tolist()[:2] == [True, True]
    assert len(spec) == ib.all_lambdas.numel()


def test_to_dataframe_without_pandas_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    G, M = _basis()
    with pytest.raises(ImportError, match="pip install pandas"):
        tld.interaction_basis(G, M).dim_curve().to_dataframe()


def test_pca_file_does_not_store_c_pinv_and_loads_bit_for_bit(tmp_path):
    G, _ = _basis()
    pb = tld.pca_basis(G, mean=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    path = pb.save(tmp_path / "pca")
    assert "C_pinv" not in load_file(str(path))
    back = tld.InteractionBasis.load(path)
    assert torch.equal(back.C_pinv, pb.C_pinv) and torch.equal(back.C, pb.C)
    # interaction bases keep theirs (not C's transpose)
    ib = tld.interaction_basis(*_basis())
    assert "C_pinv" in load_file(str(ib.save(tmp_path / "ib")))


def test_old_pca_files_with_c_pinv_still_load(tmp_path):
    G, _ = _basis()
    pb = tld.pca_basis(G)
    path = pb.save(tmp_path / "pca")
    tensors = {**load_file(str(path)), "C_pinv": pb.C_pinv}
    save_tensors(path, tensors, sidecar=False)  # the earlier layout: C_pinv stored, and in the checksum
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = tensors_checksum(tensors)
    meta_path.write_text(json.dumps(meta))
    assert torch.equal(tld.InteractionBasis.load(path).C_pinv, pb.C_pinv)


def test_colab_links_and_clone_follow_the_one_repository_setting():
    """README and notebooks name the repository of pyproject's [project.urls] (scripts/set_repository.py)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "set_repository.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import set_repository
    finally:
        sys.path.pop(0)
    text = "[x](https://colab.research.google.com/github/a/b/blob/main/d.ipynb) git clone https://github.com/a/b.git"
    assert set_repository.rewrite(text, "me/fork") == (
        "[x](https://colab.research.google.com/github/me/fork/blob/main/d.ipynb) git clone https://github.com/me/fork.git"
    )


def test_notebooks_run_the_command_through_sys_executable():
    """A kernel from a venv that was never activated has no ``tl-degeneracy`` on PATH."""
    notebooks = {p.name: p.read_text() for p in (REPO / "demos").glob("*.ipynb")}
    assert notebooks
    for name, text in notebooks.items():
        assert '[\\"tl-degeneracy\\"' not in text, name
    assert 'sys.executable, \\"-m\\", \\"tl_degeneracy\\"' in notebooks["Sweeps.ipynb"]
