"""tl_degeneracy: degeneracy in the loss landscape for mechanistic interpretability on TransformerLens models.

The public face. Data flows one way (see ``docs/ARCHITECTURE.md``): token data (:func:`token_batches`) →
collection (:func:`collect`) → statistics (:class:`Stats`) → analyses (:func:`interaction_basis`,
:func:`head_sync`, :func:`neuron_sync`; :func:`estimate_llc` runs the model) → reports
(``tl_degeneracy.report``, loaded on first use so that ``import tl_degeneracy`` does not import matplotlib).

Example::

    import tl_degeneracy as tld
    model = tld.load_model(tld.bundled_model_path())
    data = tld.token_batches(model, "stdlib-heldout", seq_len=128, batch_size=16, n_tokens=8192)
    stats = tld.collect(model, data, sites="resid_pre,mlp_post", jacobian="kl")
    basis = tld.interaction_basis(stats.gram("blocks.1.hook_resid_pre"),
                                  stats.jacobian_gram("blocks.1.hook_resid_pre"))
"""

from typing import Any

from tl_degeneracy._version import __version__
from tl_degeneracy.adapter import ModelAdapter, ModelShape, load_model, parameter_masks, parameter_selections
from tl_degeneracy.analysis import (
    DimCurve,
    HeadSync,
    InteractionBasis,
    NeuronSync,
    directions_needed,
    head_sync,
    identity_basis,
    interaction_bases,
    interaction_basis,
    neuron_sync,
    pca_basis,
)
from tl_degeneracy.analysis.graph import InteractionGraph, Modules, find_modules
from tl_degeneracy.collection import (
    AblationCurve,
    MemoryPlan,
    ablation_curve,
    ablation_curves,
    collect,
    full_stream_hooks,
    measure_loss,
    measure_losses,
    plan_memory,
)
from tl_degeneracy.data import (
    ModAddData,
    TokenBatch,
    TokenBatches,
    bundled_data_path,
    bundled_model_path,
    load_data,
    modadd_data,
    token_batches,
)
from tl_degeneracy.errors import (
    BadInputError,
    CorruptFileError,
    FormatVersionError,
    IncompatibleStatsError,
    NonFiniteError,
    SamplerDivergedError,
    TLDegeneracyError,
    UnknownHookError,
)
from tl_degeneracy.llc import (
    LLCCalibration,
    LLCResult,
    LLCScaleSweep,
    calibrate_llc,
    estimate_llc,
    llc_scale_sweep,
    sgld_llc,
)
from tl_degeneracy.llc.parallel import estimate_llc_distributed, llc_scale_sweep_distributed
from tl_degeneracy.methods import (
    EdgeAblationCurve,
    EdgesNeeded,
    edge_ablation_curve,
    edges_needed,
    interaction_graph,
    local_interaction_bases,
)
from tl_degeneracy.sites import SITE_KINDS, resolve_sites
from tl_degeneracy.stats import Stats

__all__ = [
    "EdgeAblationCurve",
    "EdgesNeeded",
    "edge_ablation_curve",
    "edges_needed",
    "local_interaction_bases",
    "interaction_graph",
    "find_modules",
    "Modules",
    "InteractionGraph",
    "SITE_KINDS",
    "AblationCurve",
    "BadInputError",
    "DimCurve",
    "HeadSync",
    "IncompatibleStatsError",
    "CorruptFileError",
    "FormatVersionError",
    "InteractionBasis",
    "LLCCalibration",
    "LLCResult",
    "LLCScaleSweep",
    "MemoryPlan",
    "ModelAdapter",
    "ModelShape",
    "NeuronSync",
    "NonFiniteError",
    "SamplerDivergedError",
    "Stats",
    "TLDegeneracyError",
    "TokenBatch",
    "TokenBatches",
    "UnknownHookError",
    "__version__",
    "ablation_curve",
    "ablation_curves",
    "bundled_data_path",
    "bundled_model_path",
    "calibrate_llc",
    "collect",
    "directions_needed",
    "estimate_llc",
    "full_stream_hooks",
    "estimate_llc_distributed",
    "head_sync",
    "identity_basis",
    "interaction_bases",
    "interaction_basis",
    "llc_scale_sweep",
    "llc_scale_sweep_distributed",
    "load_data",
    "ModAddData",
    "modadd_data",
    "load_model",
    "measure_loss",
    "measure_losses",
    "neuron_sync",
    "parameter_masks",
    "parameter_selections",
    "pca_basis",
    "plan_memory",
    "report",
    "resolve_sites",
    "sgld_llc",
    "token_batches",
]


def __getattr__(name: str) -> Any:
    """``tl_degeneracy.report`` (tables and plots, imports matplotlib) is loaded on first use."""
    if name == "report":
        from tl_degeneracy.run import report

        return report
    raise AttributeError(f"module 'tl_degeneracy' has no attribute {name!r}")
