"""The local learning coefficient: SGLD sampling (:mod:`~tl_degeneracy.llc.sgld`) and the behavioral loss
of a TransformerLens model (:mod:`~tl_degeneracy.llc.behavioral`) (paper §2, SPEC §5). The LLC is the one
analysis that runs the model: it moves the parameters."""

from tl_degeneracy.llc.behavioral import LLCScaleSweep, estimate_llc, llc_scale_sweep
from tl_degeneracy.llc.calibrate import LLCCalibration, calibrate_llc
from tl_degeneracy.llc.sgld import LLCResult, sgld_llc

__all__ = [
    "LLCCalibration", "LLCResult", "LLCScaleSweep", "calibrate_llc", "estimate_llc", "llc_scale_sweep", "sgld_llc",
]
