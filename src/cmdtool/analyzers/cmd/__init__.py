"""CMD, Correlation Mode Decomposition: the post-hoc analyzer (:mod:`.posthoc`), its fit pass, shared maths,
replay and drift check, and the online estimator fed during training (:mod:`.online`)."""
