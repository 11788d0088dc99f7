"""pagedllm backend plugin for the Acme accelerator (a test fixture: it runs the cpu kernels)."""

__version__ = "0.1.0"
