"""tl_degeneracy: degeneracy in the loss landscape for mechanistic interpretability on TransformerLens models.

See ``SPEC.md`` conventions: statistics are collected by :func:`collect`, analysed by
:func:`interaction_basis`, :func:`head_sync`, :func:`neuron_sync`, and :func:`estimate_llc`.
"""

__version__ = "0.1.0"

from tl_degeneracy import report
from tl_degeneracy.basis import InteractionBasis, interaction_bases, interaction_basis, pca_basis
from tl_degeneracy.behavioral import LLCScaleSweep, estimate_llc, llc_scale_sweep
from tl_degeneracy.collect import collect
from tl_degeneracy.data import (
    ModAddData,
    TokenBatch,
    TokenBatches,
    bundled_data_path,
    bundled_model_path,
    modadd_data,
    token_batches,
)
from tl_degeneracy.errors import (
    BadInputError,
    IncompatibleStatsError,
    NonFiniteError,
    SamplerDivergedError,
    TLDegeneracyError,
    UnknownHookError,
)
from tl_degeneracy.llc import LLCResult, sgld_llc
from tl_degeneracy.memory import MemoryPlan, plan_memory
from tl_degeneracy.model import ModelAdapter, ModelShape, load_model, parameter_masks, parameter_selections
from tl_degeneracy.sites import SITE_KINDS, resolve_sites
from tl_degeneracy.stats import Stats
from tl_degeneracy.sync import HeadSync, NeuronSync, head_sync, neuron_sync
