"""The backend conformance kit: a pytest plugin and test suite shipped inside pagedllm.

Run it against any installed backend::

    pytest --pyargs pagedllm.conformance --device NAME

Op level (``test_kv_cache``, ``test_attention``, ``test_fused_ops``): KV write/read-back and block copies,
attention for pure decode, pure prefill, prefill over a cached prefix and mixed batches over randomly
permuted block tables, MHA/GQA/MQA, head sizes 64/80/128 and every claimed one, every claimed block size
and dtype, against a float32 PyTorch reference with per-dtype tolerances, with caches and uninitialized
allocations poisoned. Engine level (``test_engine``): greedy generation on tiny checkpoints built on the
fly equals the ``cpu`` backend's. The kit reads the backend's capabilities, tests exactly what it claims,
and its final report lists what it skipped and why.

The plugin (``pagedllm.conformance.plugin``) is registered through the ``pytest11`` entry point; with
``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, add ``-p pagedllm.conformance.plugin``.
"""
