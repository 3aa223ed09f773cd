"""A serving engine (TGI, vLLM, transformers serve) as the backend, through its OpenAI-compatible API."""
