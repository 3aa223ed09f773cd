"""The three tabs (Configuration, Device map, Chat), one module per tab plus its components and
texts."""
