"""Command-line tools around the engine: the benchmark (``python -m tools.bench``) and the load test
(``python -m tools.loadtest``). They import optdemo; optdemo never imports them."""
