"""The shared vocabulary of every layer: errors, limits and defaults, memory budgets, the load
configuration, the OPT catalog, reply types, chat prompt layout, and secret redaction. Imports no
other optdemo package."""
