"""The offloading tiers: the memory-mapped disk tier (``disk_map``), the streamed disk tier
(``disk_stream``) and where offloaded layers run with a GPU (``gpu_policy``)."""
