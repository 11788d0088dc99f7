"""The ``cpu`` reference backend: pure PyTorch paged KV cache and attention."""
