"""The ``tl-degeneracy`` command and its stages, end to end on small models (offline, CPU, well under a minute).

A tiny random GPT-2 saved with ``save_pretrained`` (``tiny_gpt2_path``) exercises every stage; the default
path (no ``--model``/``--data``) runs on the bundled model. Every test calls ``main([...])`` in-process
except ``--help``, which goes through the installed console script.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.run import pipeline
from tl_degeneracy.run.cli import main
from tl_degeneracy.run.pipeline import Stage, parse_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ("resid_pre", "mlp_post")
N_LAYERS = 2  # of the tiny GPT-2 in tiny.save_tiny_gpt2
# small and short: the whole pipeline on the tiny model in a few seconds
FAST = ["--seq-len", "16", "--n-tokens", "450", "--batch-size", "8", "--n-probes", "2", "--llc-steps", "8",
        "--llc-burnin", "2", "--llc-chains", "2", "--llc-n-tokens", "60", "--llc-batch-size", "4",
        "--llc-nbetas", "3000,10000", "--ablate-n-tokens", "60", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    """Some Python source as plain text (what the tiny tokenizer was trained on)."""
    lines = [f"def f{i}(x):\n    return x + {i}\n\nclass A{i}:\n    pass\n" for i in range(200)]
    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text("import os\nprint(os.getcwd())\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def tiny_args(tiny_gpt2_path, text_file) -> list[str]:
    return ["--model", tiny_gpt2_path, "--data", text_file, *FAST]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_args) -> Path:
    """One complete run (every stage) of the tiny model."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(["run", *tiny_args, "--out", str(out)]) == 0
    return out


def _stderr_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _check_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, f"{path}: {image.shape}"
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"


# ---------------------------------------------------------------------------------------------------------
# the command line itself
# ---------------------------------------------------------------------------------------------------------
def test_console_script_help_lists_both_commands():
    exe = shutil.which("tl-degeneracy", path=str(Path(sys.executable).parent)) or shutil.which("tl-degeneracy")
    assert exe, "the tl-degeneracy console script is not installed: pip install -e ."
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run" in proc.stdout and "report" in proc.stdout


@pytest.mark.parametrize("text, layers", [("all", None), ("0-3", (0, 1, 2, 3)), ("0,2,5", (0, 2, 5)),
                                          ("5,1-2", (1, 2, 5)), (" 3 ", (3,))])
def test_parse_layers_accepts_ranges_lists_and_all(text, layers):
    assert parse_layers(text) == layers


@pytest.mark.parametrize("argv, message", [
    (["run", "--layers", "1-x"], "invalid layers"),
    (["run", "--layers", "3-1"], "end is below the start"),
    (["run", "--sites", "resid_pre,bogus"], "unknown site kind 'bogus'"),
    (["run", "--n-tokens", "0"], "expected a number >= 1"),
    (["run", "--stages", "stats,nope"], "unknown stage(s) nope"),
    (["run", "--jacobian", "fisher"], "invalid choice"),
    (["run", "--llc-steps", "10", "--llc-burnin", "10"], "must be below --llc-steps"),
    (["run", "--no-llc", "--stages", "llc"], "contradicts --no-llc"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_exit_2_with_a_usage_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_model_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["run", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    line = _stderr_error_line(capsys)
    assert line.startswith("error: ") and "does not exist" in line


def test_missing_data_is_a_one_line_error(tiny_gpt2_path, tmp_path, capsys):
    code = main(["run", "--model", tiny_gpt2_path, "--data", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    line = _stderr_error_line(capsys)
    assert line.startswith("error: --data") and "no such file" in line


def test_layer_out_of_range_is_a_one_line_error(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args, "--layers", "0,7", "--out", str(tmp_path / "o")]) == 1
    line = _stderr_error_line(capsys)
    assert line.startswith("error: ") and "out of range" in line and "0..1" in line


def test_hub_name_offline_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["run", "--model", "gpt2", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    line = _stderr_error_line(capsys)
    assert line.startswith("error: could not load 'gpt2'") and "save_pretrained" in line


def test_report_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert _stderr_error_line(capsys) == f"error: run folder '{tmp_path / 'nothing'}' does not exist"


def test_stage_alone_without_its_inputs_names_the_missing_stage(tmp_path, capsys):
    assert main(["run", "--stages", "basis", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    line = _stderr_error_line(capsys)
    assert "stage 'basis' reads the outputs of stage 'stats'" in line and "--stages stats" in line


def test_a_stage_needing_missing_api_reports_itself_unavailable():
    stage = Stage("probe", "needs an analysis this installation lacks", run=lambda ctx: ([], {}),
                  settings=lambda c: {}, requires=("collect", "no_such_analysis"))
    assert stage.unavailable() == (f"stage 'probe' is not available: this installation of tl_degeneracy "
                                   f"{tld.__version__} has no tld.no_such_analysis")
    assert all(s.unavailable() is None for s in pipeline.STAGES.values())


# ---------------------------------------------------------------------------------------------------------
# a full run
# ---------------------------------------------------------------------------------------------------------
PLOTS = ("spectra", "dims", "dim_vs_eps", "ablation", "head_sync", "sync_sweep", "llc_traces", "llc_scale")


def test_run_writes_every_promised_file(full_run):
    sites = [f"blocks.{x}.hook_resid_pre" for x in range(N_LAYERS)] + [f"blocks.{x}.mlp.hook_post"
                                                                    for x in range(N_LAYERS)]
    expected = ["run.json", "index.md", "summary.csv", "summary.md", "stats.safetensors", "stats.json",
                "sync/summary.json", "llc/summary.json"]
    expected += [f"bases/{s}.{k}.{e}" for s in sites for k in ("interaction", "pca") for e in ("safetensors", "json")]
    expected += [f"sync/{k}.layer{x}.safetensors" for k in ("heads", "neurons") for x in range(N_LAYERS)]
    expected += [f"llc/{sel}/llc.{e}" for sel in ("all", "blocks.0", "blocks.1") for e in ("json", "safetensors")]
    expected += [f"ablation/{s}.{k}.{e}" for s in sites for k in ("interaction", "pca")
                 for e in ("safetensors", "json")]
    expected += [f"stages/{s}.json" for s in ("stats", "basis", "ablate", "sync", "llc")]
    missing = [p for p in expected if not (full_run / p).is_file()]
    assert not missing
    assert not list(full_run.rglob("*.pkl")) and not list(full_run.rglob("*.pt"))
    assert not (full_run / "stats.partial.safetensors").exists()
    for name in PLOTS:
        _check_png(full_run / "plots" / f"{name}.png")

    run = json.loads((full_run / "run.json").read_text())
    assert run["result"] == "ok" and run["command"].startswith("tl-degeneracy run --model")
    assert {"torch", "transformer-lens", "tl_degeneracy"} <= set(run["versions"])
    assert run["machine"]["cpu_count"] >= 1 and run["wall_seconds"] > 0
    assert {s: v["status"] for s, v in run["stages"].items() if not s.startswith("_")} == {
        "stats": "ran", "basis": "ran", "ablate": "ran", "sync": "ran", "llc": "ran", "report": "ran"}


def test_index_links_every_plot_with_relative_paths(full_run):
    index = (full_run / "index.md").read_text()
    for name in PLOTS:
        assert f"](plots/{name}.png)" in index
    assert "Not in this folder" not in index
    assert str(full_run) not in index.split("## Summary")[1]  # links and table are relative


def test_summary_tables_have_one_row_per_layer_and_site(full_run):
    with open(full_run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_LAYERS * len(SITES)
    assert {(r["layer"], r["site"]) for r in rows} == {
        (str(x), f"blocks.{x}.{'hook_resid_pre' if k == 'resid_pre' else 'mlp.hook_post'}")
        for x in range(N_LAYERS) for k in SITES}
    stats = tld.Stats.load(full_run / "stats.safetensors")
    for r in rows:
        site = r["site"]
        basis = tld.InteractionBasis.load(full_run / "bases" / f"{site}.interaction")
        assert int(r["d"]) == stats.gram(site).shape[0] == basis.input_dim
        assert int(r["ib_dim"]) == basis.dim and int(r["rank_G"]) == basis.rank_G
        assert 0 < int(r["ib_dim"]) <= int(r["rank_G"]) <= int(r["d"])
        assert int(r["pca_dim"]) <= int(r["d"])
        assert float(r["top_lambda"]) == pytest.approx(float(basis.all_lambdas[0]))
        curve = tld.AblationCurve.load(full_run / "ablation" / f"{site}.interaction")
        assert int(r["ib_needed"]) == tld.directions_needed(curve, 0.01) and 0 <= int(r["pca_needed"])
        assert 1 <= int(r["head_blocks"]) <= 4 and 1 <= int(r["neuron_blocks"]) <= 64
        llc = json.loads((full_run / "llc" / f"blocks.{r['layer']}" / "llc.json").read_text())
        assert float(r["llc"]) == pytest.approx(llc["llc_mean"]) and float(r["eps_hat"]) == pytest.approx(
            llc["eps_hat"])
    md = (full_run / "summary.md").read_text().strip().splitlines()
    assert len(md) == 2 + N_LAYERS * len(SITES)
    assert md[0].startswith("| layer | site | d | rank G | IB dim | PCA dim | top Λ |")


def test_report_regenerates_tables_plots_and_index_without_a_model(full_run, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    generated = ["summary.csv", "summary.md", "index.md"] + [f"plots/{p}.png" for p in PLOTS]
    before = {p: (copy / p).read_bytes() for p in ("summary.csv", "summary.md")}
    for p in generated:
        (copy / p).unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("report must not load a model")

    monkeypatch.setattr(tld, "load_model", no_model)
    assert main(["report", str(copy)]) == 0
    assert all((copy / p).is_file() for p in generated)
    for name in PLOTS:
        _check_png(copy / "plots" / f"{name}.png")
    assert {p: (copy / p).read_bytes() for p in before} == before


# ---------------------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------------------
def test_stats_alone_then_full_run_reuses_the_statistics(tiny_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resume"
    args = [*tiny_args, "--no-llc", "--out", str(out)]
    assert main(["run", *args, "--stages", "stats"]) == 0
    assert not (out / "bases").exists()
    stamp = (out / "stats.safetensors").stat().st_mtime_ns
    marker = json.loads((out / "stages" / "stats.json").read_text())

    calls = []
    monkeypatch.setattr(tld, "collect", lambda *a, **k: calls.append(1))
    capsys.readouterr()
    assert main(["run", *args]) == 0
    assert calls == [] and "stats: up to date" in capsys.readouterr().err
    assert (out / "stats.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "stages" / "stats.json").read_text())["id"] == marker["id"]
    assert (out / "index.md").is_file() and len(list((out / "bases").glob("*.safetensors"))) == 2 * 2 * N_LAYERS
    assert (out / "sync" / "summary.json").is_file()
    basis_id = json.loads((out / "stages" / "basis.json").read_text())["id"]

    # other settings are refused, naming the difference; --force recomputes, and the bases follow
    monkeypatch.undo()
    assert main(["run", *args, "--stages", "stats", "--n-tokens", "300"]) == 1
    assert "n_tokens: 450 → 300" in _stderr_error_line(capsys)
    assert main(["run", *args, "--stages", "stats", "--force"]) == 0
    assert json.loads((out / "stages" / "stats.json").read_text())["id"] != marker["id"]
    assert main(["run", *args, "--stages", "basis"]) == 0
    assert "inputs are recomputed since it ran" in capsys.readouterr().err
    assert json.loads((out / "stages" / "basis.json").read_text())["id"] != basis_id


def test_interrupted_statistics_resume_from_the_checkpoint(tiny_args, full_run, tmp_path, monkeypatch, capsys):
    collect_module = importlib.import_module("tl_degeneracy.collection.engine")
    out = tmp_path / "interrupted"
    real, calls = collect_module.run_batch, []

    def interrupt_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "run_batch", interrupt_after_three)
    assert main(["run", *tiny_args, "--out", str(out), "--stages", "stats"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    partial = tld.Stats.load(out / "stats.partial.safetensors")
    assert partial.meta["batches_done"] == 2
    assert json.loads((out / "run.json").read_text())["result"] == "interrupted"

    counted = []
    monkeypatch.setattr(collect_module, "run_batch", lambda *a, **k: counted.append(1) or real(*a, **k))
    assert main(["run", *tiny_args, "--out", str(out), "--stages", "stats"]) == 0
    assert "resuming the interrupted pass" in capsys.readouterr().err
    resumed, reference = tld.Stats.load(out / "stats.safetensors"), tld.Stats.load(full_run / "stats.safetensors")
    assert len(counted) == reference.meta["batches_done"] - partial.meta["batches_done"]
    assert resumed.n_tokens == reference.n_tokens
    for key, value in reference.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], value, rtol=0, atol=0, msg=key)
    assert not (out / "stats.partial.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# the default path: bundled model and data
# ---------------------------------------------------------------------------------------------------------
def test_default_run_uses_the_bundled_model_and_data(tmp_path):
    if not (tld.data.DATA_DIR / "stdlib-gpt2" / "config.json").is_file():
        pytest.skip("the bundled model tl_degeneracy/bundled/stdlib-gpt2 is not in this checkout")
    out = tmp_path / "bundled"
    code = main(["run", "--layers", "0", "--n-tokens", "256", "--n-probes", "1", "--no-llc", "--no-progress",
                 "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert code == 0
    stages = json.loads((out / "stages" / "stats.json").read_text())["settings"]
    assert stages["model"] == str(tld.bundled_model_path().resolve())
    assert stages["data"] == str(tld.bundled_data_path().resolve())
    with open(out / "summary.csv") as f:
        assert [r["site"] for r in csv.DictReader(f)] == ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"]
    _check_png(out / "plots" / "spectra.png")
    assert os.path.getsize(out / "index.md") > 0


def test_interrupted_ablate_stage_resumes_site_by_site(tiny_args, full_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ablate"
    shutil.copytree(full_run, out)
    (out / "stages" / "ablate.json").unlink()
    shutil.rmtree(out / "ablation")
    real, calls = tld.ablation_curves, []

    def interrupt_after_one(*args, **kwargs):
        calls.append(kwargs["site"])
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tld, "ablation_curves", interrupt_after_one)
    assert main(["run", *tiny_args, "--out", str(out), "--stages", "ablate"]) == 130
    first = calls[0]
    progress = out / ".progress" / "ablate" / "ablation"  # finished sites wait here; nothing is in place yet
    before = tld.AblationCurve.load(progress / f"{first}.interaction.safetensors")
    assert (progress / "identity.json").is_file() and not list(out.glob("ablation/*.safetensors"))

    again = []
    monkeypatch.setattr(tld, "ablation_curves", lambda *a, **k: again.append(k["site"]) or real(*a, **k))
    assert main(["run", *tiny_args, "--out", str(out), "--stages", "ablate"]) == 0
    assert first not in again and len(again) == len(list((full_run / "bases").glob("*.interaction.safetensors"))) - 1
    after = tld.AblationCurve.load(out / "ablation" / f"{first}.interaction.safetensors")
    assert after.keep == before.keep and torch.equal(after.loss, before.loss)  # kept, not recomputed
    assert not (out / ".progress").exists()
    for path in (full_run / "ablation").glob("*.safetensors"):  # same curves as the uninterrupted run
        a, b = tld.AblationCurve.load(path), tld.AblationCurve.load(out / "ablation" / path.name)
        assert torch.equal(a.loss, b.loss)
