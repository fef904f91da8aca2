"""Diffuser API: the OpenAI Images API on Hugging Face diffusers pipelines."""

__version__ = "0.1.0"
