"""Collection: hooks on the model stream per-batch sums into float64 totals (data → collection → stats).

- :mod:`~tl_degeneracy.collection.engine`: the component protocol, one batch, one checkpointed pass;
- :mod:`~tl_degeneracy.collection.kernels`: pure per-batch products (Grams, synchronisation sums);
- :mod:`~tl_degeneracy.collection.components`, :mod:`~tl_degeneracy.collection.jacobian`: what each
  statistic reads from which hook (routing), and the output-Jacobian probes;
- :mod:`~tl_degeneracy.collection.memory`: the memory plan; :mod:`~tl_degeneracy.collection.collect`:
  :func:`collect`, the public entry point;
- :mod:`~tl_degeneracy.collection.ablation`: ablation curves, :func:`measure_losses` (interventions' losses).
"""

from tl_degeneracy.collection.ablation import (
    AblationCurve,
    LossMeasurement,
    ablation_curve,
    ablation_curves,
    full_stream_hooks,
    measure_loss,
    measure_losses,
)
from tl_degeneracy.collection.collect import collect
from tl_degeneracy.collection.memory import MemoryPlan, plan_memory

__all__ = [
    "AblationCurve",
    "LossMeasurement",
    "MemoryPlan",
    "ablation_curve",
    "ablation_curves",
    "collect",
    "full_stream_hooks",
    "measure_loss",
    "measure_losses",
    "plan_memory",
]
