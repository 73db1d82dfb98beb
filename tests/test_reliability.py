"""Issue 15: nothing lost, nothing stale, nothing silently wrong.

One test (or a few) per class of fault: run folders are ours alone and never destroyed before their
replacement exists; identity by content (weights and data fingerprints); what is read is verified (checksums,
format versions, typed errors); one-line CLI errors; validated inputs; PSD checks; TF32 through the user's
API; cost guards. Tiny models built in the test, a few seconds each.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy import _io
from tl_degeneracy.run.cli import main
from tl_degeneracy.run.layout import RunFolder

SITE = "blocks.0.hook_resid_pre"
# the tiny pipeline without the LLC (the llc stage belongs to another issue), a second or two per run
FAST = ["--seq-len", "16", "--n-tokens", "300", "--batch-size", "8", "--n-probes", "1", "--no-progress",
        "--device", "cpu", "--threads", "1", "--no-llc"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    lines = [f"def f{i}(x):\n    return x + {i}\n\nclass A{i}:\n    pass\n" for i in range(120)]
    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text("".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def args(tiny_gpt2_path, text_file) -> list[str]:
    return ["--model", tiny_gpt2_path, "--data", text_file, *FAST]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1. a run folder is ours alone, and never destroyed before its replacement exists
# ---------------------------------------------------------------------------------------------------------
def test_a_users_non_empty_folder_is_refused_and_untouched(args, tmp_path, capsys):
    mine = tmp_path / "documents"
    (mine / "bases").mkdir(parents=True)
    (mine / "bases" / "notes.txt").write_text("mine")
    assert main(["run", *args, "--out", str(mine)]) == 1
    assert "not a tl-degeneracy run folder" in _error_line(capsys)
    assert sorted(p.name for p in mine.rglob("*")) == ["bases", "notes.txt"]


def test_user_files_inside_a_run_folder_survive_reruns(args, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out)]) == 0
    for sub in ("bases", "sync", "plots"):
        (out / sub / "notes.txt").write_text("mine")
    assert main(["run", *args, "--out", str(out), "--force"]) == 0
    for sub in ("bases", "sync", "plots"):
        assert (out / sub / "notes.txt").read_text() == "mine"
    manifest = RunFolder(out).manifest()
    assert "bases/notes.txt" not in manifest["basis"] and manifest["basis"]
    assert not (out / ".staging").exists()


def test_a_failed_force_recompute_keeps_the_old_results(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--stages", "stats,basis"]) == 0
    before = {p: p.read_bytes() for p in (out / "bases").glob("*")}
    marker = (out / "stages" / "basis.json").read_text()

    def fail(*a, **k):
        raise tld.BadInputError("simulated failure in the middle of the basis stage")

    monkeypatch.setattr(tld, "pca_basis", fail)
    assert main(["run", *args, "--out", str(out), "--stages", "basis", "--force"]) == 1
    assert "simulated failure" in _error_line(capsys)
    assert {p: p.read_bytes() for p in (out / "bases").glob("*")} == before
    assert (out / "stages" / "basis.json").read_text() == marker
    assert not (out / ".staging").exists()


def test_two_runs_on_one_folder_do_not_interleave(args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--stages", "stats"]) == 0
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{other.pid}\n")
        assert main(["run", *args, "--out", str(out), "--force"]) == 1
        line = _error_line(capsys)
        assert "in use by another run" in line and f"PID {other.pid}" in line
    finally:
        other.kill()
        other.wait()
    # the holder is gone (kill -9 leaves its lock behind): the next run takes the stale lock over
    assert main(["run", *args, "--out", str(out)]) == 0
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------
# 2. identity by content, not by path
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.tl3
def test_stats_record_weight_and_data_fingerprints_and_merge_refuses_other_weights():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    a = tld.collect(model, data, sites=[SITE], progress=False)
    assert a.meta["model"]["weights"].startswith("xxh3_128:")
    assert a.meta["data"]["fingerprint"].startswith("sha256:")
    with torch.no_grad():
        next(iter(model.parameters())).add_(1e-3)
    b = tld.collect(model, tld.token_batches(model, random_tokens(2, 8, seed=1), batch_size=2), sites=[SITE],
                    progress=False)
    with pytest.raises(tld.IncompatibleStatsError, match="model"):
        a.merge(b)


@pytest.mark.tl3
def test_merge_of_a_stats_with_itself_is_refused():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    a = tld.collect(model, data, sites=[SITE], progress=False)
    with pytest.raises(tld.IncompatibleStatsError, match="count twice"):
        a.merge(a)
    with pytest.raises(tld.IncompatibleStatsError, match="count twice"):
        a.merge(tld.collect(model, data, sites=[SITE], progress=False))
    other = tld.collect(model, tld.token_batches(model, random_tokens(2, 8, seed=1), batch_size=2), sites=[SITE],
                        progress=False)
    assert a.merge(other).n_tokens == a.n_tokens + other.n_tokens
    with pytest.raises(tld.IncompatibleStatsError, match="count twice"):
        a.merge(other).merge(other)


@pytest.mark.tl3
def test_resume_refuses_a_checkpoint_of_other_weights_or_data(tmp_path):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(4, 8), batch_size=2)
    ckpt = tmp_path / "c.safetensors"
    tld.collect(model, data, sites=[SITE], checkpoint=ckpt, checkpoint_every=1, progress=False)
    ckpt_meta = tld.Stats.load(ckpt).meta
    ckpt_meta["batches_done"] = 1  # pretend it was interrupted after one batch
    tld.Stats(tld.Stats.load(ckpt).tensors, ckpt_meta).save(ckpt)
    other_data = tld.token_batches(model, random_tokens(4, 8, seed=3), batch_size=2)
    with pytest.raises(tld.IncompatibleStatsError, match="data"):
        tld.collect(model, other_data, sites=[SITE], checkpoint=ckpt, resume=True, progress=False)
    with torch.no_grad():
        next(iter(model.parameters())).mul_(1.01)
    with pytest.raises(tld.IncompatibleStatsError, match="model"):
        tld.collect(model, data, sites=[SITE], checkpoint=ckpt, resume=True, progress=False)


@pytest.mark.tl3
def test_a_checkpoint_path_without_the_suffix_resumes(tmp_path, monkeypatch):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(4, 8), batch_size=2)
    engine = importlib.import_module("tl_degeneracy.collection.engine")
    real, calls = engine.run_batch, []

    def crash_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "run_batch", crash_second)
    with pytest.raises(KeyboardInterrupt):
        tld.collect(model, data, sites=[SITE], checkpoint=tmp_path / "ckpt", checkpoint_every=1, progress=False)
    calls.clear()
    monkeypatch.setattr(engine, "run_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    tld.collect(model, data, sites=[SITE], checkpoint=tmp_path / "ckpt", resume=True, progress=False)
    assert len(calls) == len(data) - 1  # the first batch came from the checkpoint


def test_rerun_sees_changed_weights_and_data_behind_the_same_path(tiny_gpt2_path, text_file, tmp_path, capsys):
    import shutil

    model, data = tmp_path / "model", tmp_path / "data.txt"
    shutil.copytree(tiny_gpt2_path, model)
    shutil.copy(text_file, data)
    base = ["--model", str(model), "--data", str(data), *FAST, "--stages", "stats", "--out", str(tmp_path / "r")]
    assert main(["run", *base]) == 0
    assert main(["run", *base]) == 0
    assert "up to date" in capsys.readouterr().err
    data.write_text(data.read_text().replace("return x", "return -x"))
    assert main(["run", *base]) == 1
    assert "data_fingerprint" in _error_line(capsys)
    assert main(["run", *base, "--force"]) == 0
    capsys.readouterr()
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["run", *base]) == 1
    assert "model_fingerprint" in _error_line(capsys)
    assert main(["run", *base, "--force"]) == 0
    marker = json.loads((tmp_path / "r" / "stages" / "stats.json").read_text())
    assert marker["settings"]["model_fingerprint"].startswith("sha256:")


# ---------------------------------------------------------------------------------------------------------
# 3. verify what is read
# ---------------------------------------------------------------------------------------------------------
def _saved_stats(tmp_path: Path) -> Path:
    model = make_tiny_model()
    stats = tld.collect(model, tld.token_batches(model, random_tokens(2, 8), batch_size=2), sites=[SITE],
                        progress=False)
    return stats.save(tmp_path / "s.safetensors")


@pytest.mark.tl3
def test_truncated_and_bit_flipped_files_are_detected(tmp_path):
    path = _saved_stats(tmp_path)
    good = path.read_bytes()
    assert json.loads(path.with_suffix(".json").read_text())["sha256"].startswith("sha256:")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(tld.CorruptFileError, match="s.safetensors"):
        tld.Stats.load(path)
    flipped = bytearray(good)
    flipped[-5] ^= 0x10  # a bit in the last tensor's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(tld.CorruptFileError, match="checksum"):
        tld.Stats.load(path)
    path.write_text("hello, I am text")
    with pytest.raises(tld.CorruptFileError, match="not a readable safetensors"):
        tld.Stats.load(path)


@pytest.mark.tl3
def test_a_newer_format_is_refused_naming_the_version_to_install(tmp_path):
    path = _saved_stats(tmp_path)
    stats = tld.Stats.load(path)
    stats.meta["format"] = 99
    stats.meta["library_version"] = "9.1.0"
    stats.save(path)
    with pytest.raises(tld.FormatVersionError, match=r"tl_degeneracy>=9\.1\.0"):
        tld.Stats.load(path)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "x.safetensors"),
              metadata={_io.FORMAT_KEY: "7", _io.WRITER_KEY: "8.0.0"})
    with pytest.raises(tld.FormatVersionError, match="version 7.*8.0.0"):
        _io.load_tensors(tmp_path / "x.safetensors")


def test_a_truncated_stats_file_is_recomputed_not_skipped(args, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = ["run", *args, "--out", str(out), "--stages", "stats"]
    assert main(cmd) == 0
    data = (out / "stats.safetensors").read_bytes()
    (out / "stats.safetensors").write_bytes(data[:-100])
    capsys.readouterr()
    assert main(cmd) == 0
    err = capsys.readouterr().err
    assert "runs again" in err and "up to date" not in err
    tld.Stats.load(out / "stats.safetensors")


# ---------------------------------------------------------------------------------------------------------
# 4. one-line errors for every failure the user can cause
# ---------------------------------------------------------------------------------------------------------
def test_corrupted_files_give_one_error_line(args, tiny_gpt2_path, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--stages", "stats,basis"]) == 0
    cases = {
        "stats.safetensors": b"not safetensors at all",
        "stages/stats.json": b"{truncated",
    }
    for rel, junk in cases.items():
        saved = (out / rel).read_bytes()
        (out / rel).write_bytes(junk)
        assert main(["run", *args, "--out", str(out), "--stages", "basis"]) == 1, rel
        _error_line(capsys)
        (out / rel).write_bytes(saved)
    # a text file named .safetensors as --data, a truncated model, a corrupted run.json for the report
    fake = tmp_path / "fake.safetensors"
    fake.write_text("text")
    assert main(["run", "--model", tiny_gpt2_path, "--data", str(fake), *FAST, "--out", str(tmp_path / "a")]) == 1
    assert "fake.safetensors" in _error_line(capsys)
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_gpt2_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["run", "--model", str(broken), "--data", text_file, *FAST, "--out", str(tmp_path / "b")]) == 1
    assert "cannot load the model" in _error_line(capsys)


def test_force_discards_a_partial_checkpoint_after_a_settings_change(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    engine = importlib.import_module("tl_degeneracy.collection.engine")
    real, calls = engine.run_batch, []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "run_batch", interrupt)
    assert main(["run", *args, "--out", str(out), "--stages", "stats", "--batch-size", "2"]) == 130
    assert (out / "stats.partial.safetensors").exists()
    monkeypatch.setattr(engine, "run_batch", real)
    capsys.readouterr()
    assert main(["run", *args, "--out", str(out), "--stages", "stats", "--batch-size", "2", "--seed", "3"]) == 1
    line = _error_line(capsys)
    assert "--force" in line and "resume=False" not in line
    assert main(["run", *args, "--out", str(out), "--stages", "stats", "--batch-size", "2", "--seed", "3",
                 "--force"]) == 0
    assert "discarding the partial checkpoint" in capsys.readouterr().err
    assert not (out / "stats.partial.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# 5. inputs validated as promised
# ---------------------------------------------------------------------------------------------------------
def test_empty_binary_and_short_data_are_refused_or_warned(tiny_gpt2_path, text_file, tmp_path, capsys):
    empty, png = tmp_path / "empty.txt", tmp_path / "picture.png"
    empty.write_text("")
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    for path, why in ((empty, "is empty"), (png, "not UTF-8 text")):
        assert main(["run", "--model", tiny_gpt2_path, "--data", str(path), *FAST, "--out", str(tmp_path / "x")]) == 1
        assert why in _error_line(capsys)
    model = tld.load_model(tiny_gpt2_path)
    with pytest.warns(UserWarning, match=r"fewer than the 5000 asked for"):
        batches = tld.data.load_data(model, text_file, seq_len=16, batch_size=4, n_tokens=5000)
    assert 500 < batches.n_counted < 5000
    with pytest.raises(tld.BadInputError, match="lower --n-tokens"):
        tld.data.load_data(model, text_file, seq_len=16, batch_size=4, n_tokens=10_000_000)


@pytest.mark.tl3
def test_float_token_ids(tmp_path):
    from safetensors.torch import save_file

    model = make_tiny_model()
    save_file({"tokens": torch.tensor([1.0, 2.5, 3.0])}, str(tmp_path / "t.safetensors"))
    with pytest.raises(tld.BadInputError, match="not whole numbers"):
        tld.token_batches(model, tmp_path / "t.safetensors", seq_len=4)
    save_file({"tokens": torch.tensor([1.0, 2.0, 3.0, 4.0])}, str(tmp_path / "w.safetensors"))
    ok = tld.token_batches(model, tmp_path / "w.safetensors", seq_len=4, include_bos=True)
    assert ok.tokens.dtype == torch.int64 and ok.tokens.flatten().tolist()[-4:] == [1, 2, 3, 4]
    with pytest.raises(tld.BadInputError, match="integer ids"):
        tld.TokenBatches(torch.rand(2, 4) * 10, torch.ones(2, 4, dtype=torch.bool), 1)


@pytest.mark.tl3
def test_nan_threshold_for_blocks_is_refused():
    model = make_tiny_model()
    stats = tld.collect(model, tld.token_batches(model, random_tokens(2, 8), batch_size=2), head_sync=True,
                        progress=False)
    result = tld.head_sync(stats, 0)
    with pytest.raises(tld.BadInputError, match="finite"):
        result.blocks(float("nan"))


# ---------------------------------------------------------------------------------------------------------
# 6. linear algebra inputs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.tl3
def test_non_psd_gram_matrices_are_refused_naming_the_eigenvalue():
    g = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    m = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    with pytest.raises(tld.BadInputError, match=r"M is not positive-semidefinite.*-0\.5.*tolerance"):
        tld.interaction_basis(g, m)
    with pytest.raises(tld.BadInputError, match=r"G is not positive-semidefinite.*-0\.5"):
        tld.pca_basis(m)
    # rounding-level negatives (a centred Gram of float32 data) still pass
    # rank 6 in 8 dimensions, well conditioned (orthonormal rows), so the interaction basis's Λ = eig(cov)² stays
    # far above its relative tolerance: with an unseeded Gaussian 6×8 map, cov could be ill-conditioned enough
    # (λ_min/λ_max < 1e-3) that one Λ fell below 1e-6·Λ_max, and the test failed for some test orders
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(8, 6, dtype=torch.float64, generator=gen)).Q.T  # [6, 8], orthonormal rows
    x = torch.randn(200, 6, dtype=torch.float64, generator=gen) @ q
    cov = torch.cov(x.T)
    assert tld.pca_basis(cov).dim == 6
    assert tld.interaction_basis(cov, cov).dim == 6


# ---------------------------------------------------------------------------------------------------------
# 7. TF32 through PyTorch's newer fp32_precision API
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.tl3
def test_collect_works_when_tf32_was_set_through_the_new_api(monkeypatch):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no fp32_precision API")
    engine = importlib.import_module("tl_degeneracy.collection.engine")
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    seen, real = [], engine.run_batch
    monkeypatch.setattr(engine, "run_batch", lambda *a, **k: seen.append(matmul.fp32_precision) or real(*a, **k))
    matmul.fp32_precision = "tf32"
    try:
        tld.collect(model, data, sites=[SITE], progress=False)
        assert seen and set(seen) == {"ieee"}
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = "none"  # back to the legacy API for the other tests
    assert torch.get_float32_matmul_precision() == "highest"


# ---------------------------------------------------------------------------------------------------------
# 8. cost guards
# ---------------------------------------------------------------------------------------------------------
def test_an_absurd_probe_count_is_refused_before_compute(args, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(tld, "load_model", lambda *a, **k: loaded.append(1))
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--n-probes", "1000000"]) == 1
    assert "--yes" in _error_line(capsys)
    assert not loaded and not out.exists()


def test_the_plan_says_the_cost_before_the_run(args, tmp_path, capsys):
    assert main(["run", *args, "--out", str(tmp_path / "run"), "--stages", "stats"]) == 0
    err = capsys.readouterr().err
    plan = next(x for x in err.splitlines() if "plan:" in x)
    assert "1 forward and 1 backward(s) each" in plan
    assert err.index("plan:") < err.index("stats: running")


# ---------------------------------------------------------------------------------------------------------
# 9. durability: every result file through the one writer
# ---------------------------------------------------------------------------------------------------------
def test_every_file_of_a_run_is_written_through_the_atomic_writer(args, tmp_path, monkeypatch):
    written = []
    real = _io.atomic_write

    def spy(path, write):
        written.append(Path(path).resolve())
        return real(path, write)

    monkeypatch.setattr(_io, "atomic_write", spy)
    for module in ("tl_degeneracy.run.report", "tl_degeneracy.run.layout"):
        mod = importlib.import_module(module)
        if hasattr(mod, "atomic_write"):
            monkeypatch.setattr(mod, "atomic_write", spy)
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out)]) == 0
    out = out.resolve()
    # a stage writes into .staging/{stage}/ and its files are renamed into place: compare relative paths
    rel = set()
    for p in written:
        parts = p.relative_to(out).parts
        rel.add(str(Path(*parts[2:])) if parts[0] == ".staging" else str(Path(*parts)))
    files = {os.path.relpath(p, out) for p in out.rglob("*") if p.is_file()}
    assert files - rel == set()


@pytest.mark.tl3
def test_a_basis_records_the_fingerprints_of_its_statistics_and_checks_its_files(tmp_path):
    model = make_tiny_model()
    stats = tld.collect(model, tld.token_batches(model, random_tokens(4, 8), batch_size=2), sites=[SITE],
                        jacobian="kl", progress=False)
    basis = tld.interaction_bases(stats)[SITE]
    assert basis.source["weights"] == stats.meta["model"]["weights"]
    assert basis.source["data"][0].startswith(stats.meta["data"]["fingerprint"])
    path = basis.save(tmp_path / "b")
    assert tld.InteractionBasis.load(path).source == basis.source
    meta = json.loads((tmp_path / "b.json").read_text())
    meta["version"] = 99
    (tmp_path / "b.json").write_text(json.dumps(meta))
    with pytest.raises(tld.FormatVersionError, match="version 99"):
        tld.InteractionBasis.load(path)


@pytest.mark.tl3
def test_collect_refuses_an_exact_estimator_on_a_large_input_before_compute(monkeypatch):
    model = make_tiny_model(d_vocab=600, n_ctx=16)
    data = tld.token_batches(model, random_tokens(2, 16, vocab=600), batch_size=2)  # T·V = 9600 backwards
    engine = importlib.import_module("tl_degeneracy.collection.engine")
    monkeypatch.setattr(engine, "run_batch", lambda *a, **k: pytest.fail("computed before refusing"))
    with pytest.raises(tld.BadInputError, match="allow_expensive"):
        tld.collect(model, data, sites=[SITE], jacobian="kl", estimator="exact", progress=False)
    with pytest.raises(tld.BadInputError, match="n_probes=100000"):
        tld.collect(model, data, sites=[SITE], jacobian="kl", n_probes=100_000, progress=False)
