"""The command line and the run folder: stages (:mod:`~tl_degeneracy.run.pipeline`), the report
(:mod:`~tl_degeneracy.run.report`) and ``tl-degeneracy`` (:mod:`~tl_degeneracy.run.cli`). Built on the
public face of the package; nothing else imports this layer."""
