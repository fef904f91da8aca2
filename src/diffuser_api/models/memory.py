"""The models file's ``memory`` options applied to a pipeline: quantization while loading,
CPU offload instead of moving it to the device, VAE tiling after.

Quantization goes through diffusers' own configs (``PipelineQuantizationConfig``) for the
denoiser and the text encoders, where the weights are. int8 (torchao weight-only) runs on the
CPU too; fp8 (torchao) and nf4 (bitsandbytes) need CUDA, and offload needs an accelerator to
offload from: those are refused before the server starts on a machine without one, naming
the option, rather than failing at the first request.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import CpuOffload, MemoryOptions, Quantization
from diffuser_api.models.spec import ModelSpec

# The components that hold nearly all the weights of every family.
QUANTIZED_COMPONENTS = ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3")
CUDA_ONLY = (Quantization.FP8, Quantization.NF4)


# The package each quantization runs on, and how to install it.
QUANTIZATION_PACKAGES = {
    Quantization.INT8: ("torchao", "'diffuser-api[quant]'"),
    Quantization.FP8: ("torchao", "'diffuser-api[quant]'"),
    Quantization.NF4: ("bitsandbytes", "bitsandbytes"),
}


def check_memory_options(spec: ModelSpec, devices: Sequence[str]) -> None:
    """Refuse options that cannot run on the model's (resolved) devices."""
    memory = spec.memory
    on_cuda = all(device.startswith("cuda") for device in devices)
    if memory.quantization in CUDA_ONLY and not on_cuda:
        raise ModelsFileError(
            f"model '{spec.id}': memory.quantization '{memory.quantization}' needs a CUDA device "
            f"(devices: {', '.join(devices)}); use int8 or none on the CPU"
        )
    backend = QUANTIZATION_PACKAGES.get(memory.quantization)
    if backend is not None and importlib.util.find_spec(backend[0]) is None:
        raise ModelsFileError(
            f"model '{spec.id}': memory.quantization '{memory.quantization}' needs the {backend[0]} package, "
            f"which is not installed (pip install {backend[1]})"
        )
    if memory.cpu_offload is not CpuOffload.NONE:
        if not on_cuda:
            raise ModelsFileError(
                f"model '{spec.id}': memory.cpu_offload '{memory.cpu_offload}' moves weights between host RAM "
                f"and a CUDA device; on {', '.join(devices)} they are in host RAM already: use none"
            )
        if len(devices) > 1:
            raise ModelsFileError(
                f"model '{spec.id}': memory.cpu_offload serves one device; it lists {len(devices)}"
            )


def quantization_kwargs(memory: MemoryOptions, components: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments that quantize the model's large components; {} for none.

    ``components`` is ``model_index.json``: each entry names its library, and diffusers and
    transformers each need their own config class.
    """
    if memory.quantization is Quantization.NONE:
        return {}
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig

    libraries = {"diffusers": diffusers, "transformers": transformers}
    mapping = {
        name: _component_config(libraries[components[name][0]], memory.quantization, dtype)
        for name in QUANTIZED_COMPONENTS
        if isinstance(components.get(name), list) and components[name][0] in libraries
    }
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}


def _component_config(library: Any, quantization: Quantization, dtype: torch.dtype) -> Any:
    if quantization is Quantization.NF4:
        return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    scheme = Int8WeightOnlyConfig() if quantization is Quantization.INT8 else Float8WeightOnlyConfig()
    return library.TorchAoConfig(scheme)


def place(pipeline: Any, memory: MemoryOptions, device: str) -> Any:
    """Put the pipeline on its device, or let accelerate's hooks move its parts there when used."""
    if memory.cpu_offload is CpuOffload.MODEL:
        pipeline.enable_model_cpu_offload(device=device)
    elif memory.cpu_offload is CpuOffload.SEQUENTIAL:
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)
    if memory.vae_tiling:
        # Decodes (and encodes) large images tile by tile: the VAE's peak memory stops growing
        # with the image's area, at a small cost in time and seams diffusers blends away.
        pipeline.vae.enable_tiling()
    return pipeline


def stays_on_host(memory: MemoryOptions) -> bool:
    """Whether the registry's warm tier (``offload``) cannot apply: offloaded weights are in
    host RAM already, and bitsandbytes 4-bit weights cannot be moved with ``.to``."""
    return memory.cpu_offload is not CpuOffload.NONE or memory.quantization is Quantization.NF4


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass (torchao) reports its
    original dtype's element size, so its inner tensors (int8 data, scales) are counted."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def share_pipeline(pipeline_class: Any, base: Any, **components: Any) -> Any:
    """``pipeline_class.from_pipe(base)`` for a quantized base too.

    ``from_pipe`` casts every module to the pipeline's dtype, which a quantized diffusers model
    refuses even when nothing would change; its unquantized layers are in that dtype since the
    load, so for the duration of the call the quantized modules skip the cast (an attribute of
    those instances only, removed after).
    """
    quantized = [module for module in base.components.values() if getattr(module, "is_quantized", False)]
    for module in quantized:
        module.to = _unchanged(module)
    try:
        return pipeline_class.from_pipe(base, dtype=base.dtype, **components)
    finally:
        for module in quantized:
            del module.to


def _unchanged(module: Any) -> Any:
    def to(*args: Any, **kwargs: Any) -> Any:
        return module

    return to
