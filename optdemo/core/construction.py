"""The lock that every real model construction takes.

transformers builds models under process-wide patches (torch's default dtype, tie_weights, the
init functions), so two constructions in different threads can corrupt each other (a model left
with untied, uninitialised weights on "meta"). Every real construction takes this lock: the loader,
the planner (for models whose code lives in their repository) and the tiny-model builder. It lives
in its own module so that ``models`` and ``synthetic`` both import it without importing each other
in a cycle.
"""

from __future__ import annotations

import threading

construction_lock = threading.RLock()
