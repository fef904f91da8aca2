"""A Qwen2-VL processor that works without torchvision (images only, no video).

Qwen-Image-Edit and Qwen-Image-Edit-Plus pipelines take a ``Qwen2VLProcessor``. Its stock
version also wants a video processor, which needs torchvision: constructing it with
``video_processor=None`` raises ``AttributeError`` and ``from_pretrained`` raises
``OSError: Can't load video processor``. ``ProcessorMixin`` takes the list of parts from the
``__init__`` signature, so a subclass whose ``__init__`` has no ``video_processor`` argument
loads and saves only the image processor and the tokenizer. The pipelines never use video.
Without torchvision, ``AutoImageProcessor`` picks ``Qwen2VLImageProcessorPil``.

How a loader must use it:

* Stock checkpoints (``Qwen/Qwen-Image-Edit``, ``...-2509`` and local copies): their
  ``model_index.json`` names ``transformers.Qwen2VLProcessor``, which fails without
  torchvision. Load the processor here and hand it over::

      processor = load_qwen_processor(repo_or_folder)          # subfolder="processor"
      pipe = DiffusionPipeline.from_pretrained(repo_or_folder, processor=processor, ...)

* Folders saved from a pipeline that holds this class (the tiny ``tiny-qwen-image-edit*``
  models): ``model_index.json`` names ``["diffuser_api.models.qwen_processor",
  "Qwen2VLImageOnlyProcessor"]``. Diffusers never imports a module because a folder names it;
  it resolves the name from ``sys.modules`` only. So import this module before
  ``DiffusionPipeline.from_pretrained(folder)``; then it loads with no extra argument.
  Diffusers also looks up the base classes it knows (``ProcessorMixin`` ...) as attributes of
  this module to choose the load method, hence the ``ProcessorMixin`` import below.
"""

from __future__ import annotations

import os

from transformers import ProcessorMixin, Qwen2VLProcessor

__all__ = ["ProcessorMixin", "Qwen2VLImageOnlyProcessor", "load_qwen_processor"]


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with no video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_qwen_processor(
    folder_or_hub_id: str | os.PathLike, subfolder: str = "processor", **kwargs
) -> Qwen2VLImageOnlyProcessor:
    """Load the ``processor`` subfolder of a Qwen-Image-Edit checkpoint (hub id or folder).

    Extra keyword arguments (``revision``, ``cache_dir``, ``local_files_only``, ``token`` ...)
    go to ``from_pretrained``. Pass ``subfolder=""`` for a folder that is itself a processor.
    """
    return Qwen2VLImageOnlyProcessor.from_pretrained(folder_or_hub_id, subfolder=subfolder, **kwargs)
