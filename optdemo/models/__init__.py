"""Where a model comes from: a Hub id, a local folder, or the built-in tiny model; the Hub's
reachability; the one transformers compatibility shim."""
