"""Issue 17: the report marks the ceilings of the interaction-basis dimension and of the rank of G."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY, make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.run.report import CEILING_MARK, architectural_ceiling, summary_markdown, token_ceiling


def test_ceiling_rules():
    assert architectural_ceiling("blocks.0.mlp.hook_post", 512, 128) == 128  # W_out: 512 → 128
    assert architectural_ceiling("blocks.0.hook_resid_pre", 128, 128) == 128
    assert architectural_ceiling("blocks.0.mlp.hook_pre", 512, 128) == 512  # per-token slopes: no bound below d
    assert architectural_ceiling("blocks.0.mlp.hook_post", 512, None) == 512
    assert token_ceiling(3072, 2048) == 2047 and token_ceiling(128, 8192) == 128 and token_ceiling(10, None) == 10


@pytest.mark.tl3
def test_the_ceilings_bound_the_ranks_on_a_tiny_model():
    """Exact M of mlp_post (d_mlp > d_model) has rank ≤ d_model; G of few tokens has rank ≤ N − 1."""
    model = make_tiny_model()
    d_model, d_mlp = TINY["d_model"], TINY["d_mlp"]
    assert d_mlp > d_model
    data = tld.token_batches(model, random_tokens(4, 8), seq_len=8, batch_size=2)
    site = "blocks.0.mlp.hook_post"
    stats = tld.collect(model, data, sites=[site], jacobian="mse", estimator="exact", progress=False)
    M, G = stats.jacobian_gram(site), stats.gram(site)
    # float64 rank with a tolerance well above rounding of the float32 per-batch products
    rank_M = int(torch.linalg.matrix_rank(M, rtol=1e-6))
    assert rank_M <= architectural_ceiling(site, d_mlp, d_model) == d_model
    n = data.n_counted
    assert int(torch.linalg.matrix_rank(G, rtol=1e-6)) <= token_ceiling(d_mlp, n) == min(d_mlp, n - 1)


def test_summary_table_marks_values_at_their_ceiling():
    rows = [{"layer": 0, "site": "blocks.0.mlp.hook_post", "d": 512, "rank_G": 300, "G_ceiling": 300,
             "ib_dim": 128, "M_ceiling": 128, "pca_dim": 290},
            {"layer": 0, "site": "blocks.0.hook_resid_pre", "d": 128, "rank_G": 120, "G_ceiling": 128,
             "ib_dim": 90, "M_ceiling": 128, "pca_dim": 120}]
    lines = summary_markdown(rows).splitlines()
    assert "300" + CEILING_MARK in lines[2] and "128" + CEILING_MARK in lines[2]
    assert CEILING_MARK not in lines[3]


def test_run_prints_the_footprint_before_the_pass_and_a_line_per_basis_site(tmp_path):
    from tl_degeneracy.run.pipeline import RunConfig, run_stages

    lines: list[str] = []
    cfg = RunConfig(layers=(0,), n_tokens=256, n_probes=1, sync=False, device="cpu")
    run_stages(cfg, tmp_path / "run", ["stats", "basis"], progress=False, log=lines.append)  # log lines anyway
    foot = [x for x in lines if x.startswith("stats: estimated disk")]
    assert len(foot) == 1
    assert lines.index(foot[0]) < next(i for i, x in enumerate(lines) if x.startswith("stats: done"))
    per_site = [x for x in lines if x.startswith("basis: site ")]
    assert [x.split()[2:4] for x in per_site] == [["1/2", "blocks.0.hook_resid_pre:"],
                                                   ["2/2", "blocks.0.mlp.hook_post:"]]
    # the bound holds: what was written is below the estimate
    number, unit = foot[0].split("≤ ")[1].split(" (")[0].split()
    estimate = float(number) * {"MiB": 1024**2, "GiB": 1024**3}[unit]
    written = sum(p.stat().st_size for p in (tmp_path / "run").rglob("*.safetensors"))
    assert 0 < written <= estimate
