"""Serving converted models on other engines. :func:`register_vllm` is the ``vllm.general_plugins`` entry point
(see pyproject.toml): vLLM calls it in every process it starts, and only then is vLLM imported."""


def register_vllm() -> None:
    """Register the ``efficient_ops`` quantization method with vLLM (``--quantization efficient_ops``)."""
    from . import vllm_plugin

    vllm_plugin.register()


__all__ = ["register_vllm"]
