"""Running a model: loading it as planned, the manager that owns it behind a lock, the offloading
tiers (``tiers/``) and the continuous-batching engine (``batching/``)."""
