"""Model definitions (Hugging Face class and parameter names), registered by architecture name.

The built-in architectures are registered through the ``pagedllm_register_models`` hook by
``pagedllm.core.models.plugin``, the same path a third-party plugin uses to add one.
"""
