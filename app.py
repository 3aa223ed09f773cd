"""optdemo: plan, load and chat with models larger than your GPU.

    python app.py --help

Thin on purpose: parse the flags, build the app from the package, launch. Heavy imports (torch,
transformers, gradio) happen inside main(), so importing this file is instant: the engine modules
imported here import none of them at import time.
"""

from __future__ import annotations

import logging
import sys
import threading

from optdemo.app.settings import parse_settings
from optdemo.core.errors import OptdemoError
from optdemo.models.synthetic import ensure_tiny_model
from optdemo.plan.bandwidth import measured_bandwidths


def main(argv: list[str] | None = None) -> int:
    """Start the app with flags from ``argv`` (default: the command line)."""
    try:
        settings = parse_settings(argv)
    except OptdemoError as exc:
        print(f"optdemo: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from optdemo.web.blocks import create_app, launch  # gradio: imported only when the app really starts

    # Slow first-time work happens now rather than on the first visitor's page load: building the
    # built-in tiny model (a few seconds, once) and, below, measuring this machine's bandwidths for
    # the speed predictions (a few seconds, once, in the background).
    ensure_tiny_model()
    demo, service = create_app(settings)
    if settings.preload or settings.backend_url:  # with --backend-url: connect before serving
        try:
            logging.getLogger("optdemo").info("%s", service.preload())
        except OptdemoError as exc:
            if settings.public:  # visitors cannot load a model: a page without one is a dead end
                what = (
                    "a serving endpoint, and it could not be reached"
                    if settings.backend_url
                    else "a loaded model, and it could not be loaded"
                )
                print(f"optdemo: public mode needs {what}: {exc}", file=sys.stderr)
                return 2
            logging.getLogger("optdemo").error("preload failed, serving anyway: %s", exc)
    # Measured only now, not while a preload reads weights (the figures would be the load's). Not a
    # daemon: an exit (a port already taken) waits the few seconds for it, since a daemon thread
    # still inside torch when the interpreter exits aborts the process.
    threading.Thread(target=measured_bandwidths, name="optdemo-bandwidths").start()
    try:
        launch(demo, service)
    except OSError as exc:  # the port is taken or not ours to bind
        where = f"{settings.host}:{settings.port or 'the first free port from 7860'}"
        print(f"optdemo: cannot serve on {where} ({exc}): pick another --port or --host", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
