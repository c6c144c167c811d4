"""Serving pruned models outside our runtime.

A server with a paged KV cache (vLLM) gives every request one length across all layers and fixes the number of
image placeholder tokens when the prompt is processed, before the model runs. GlimpsePrune's "drop after layer K"
cannot run there; what can is pruning **before the LLM** to a count known at processing time (``keep_ratio`` x the
image's tokens), the kept tokens keeping their original M-RoPE positions.

- ``serving.spec``: which methods can run that way, the ``glimpseprune`` section of a model folder's config, and the
  per-image pruning itself (pure torch: the same method objects as our runtime, on one image at a time).
- ``serving.vllm_plugin``: the entry point vLLM calls (``vllm.general_plugins``); registers the model class.
- ``serving.vllm_qwen2_5_vl``: the Qwen2.5-VL model + processor classes for vLLM (imported by vLLM only).
- ``serving.folder``: writes a model folder that opts in (config + module weights), for ``vllm serve DIR``.
"""
