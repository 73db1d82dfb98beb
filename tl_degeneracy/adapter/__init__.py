"""The adapter: the only importer of ``transformer_lens`` / ``transformers`` (ECOSYSTEM.md).

- :mod:`~tl_degeneracy.adapter.model`: :class:`ModelAdapter` (hooks, modes, shapes, the unembedding, the
  3.x/4.x differences), :func:`load_model`, :func:`preserved_state`;
- :mod:`~tl_degeneracy.adapter.params`: parameter selections and masks, :class:`FunctionalModel`.
"""

from tl_degeneracy.adapter.model import (
    ModelAdapter,
    ModelShape,
    Unembedding,
    as_adapter,
    load_model,
    load_tokenizer,
    preserved_state,
    state_dict_source,
    transformer_lens_version,
)
from tl_degeneracy.adapter.params import FunctionalModel, parameter_masks, parameter_selections

__all__ = [
    "FunctionalModel",
    "ModelAdapter",
    "ModelShape",
    "Unembedding",
    "as_adapter",
    "load_model",
    "load_tokenizer",
    "parameter_masks",
    "parameter_selections",
    "preserved_state",
    "state_dict_source",
    "transformer_lens_version",
]
