"""Rescaling of random weights so tiny pipelines visibly react to their inputs.

At their default init scale, random diffusion transformers attend almost uniformly, so the
hundreds of padded text tokens swamp the few image tokens, and their VAEs decode to a flat
grey. Sharper attention (larger q/k RMSNorm weights) and a louder VAE output layer make the
prompt, the guidance and an edit's input image show in the pixels.
"""

from __future__ import annotations

import torch

QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


@torch.no_grad()
def sharpen_attention(transformer: torch.nn.Module, gain: float) -> None:
    """Multiply the q/k RMSNorm weights of every attention layer: logits grow by gain**2."""
    found = 0
    for name, param in transformer.named_parameters():
        if name.rsplit(".", 2)[-2] in QK_NORMS:
            param.mul_(gain)
            found += 1
    assert found, "no q/k norms found"


@torch.no_grad()
def amplify_output(conv_out: torch.nn.Module, gain: float) -> None:
    """Multiply the weights of a VAE decoder's last layer (its bias is left alone)."""
    conv_out.weight.mul_(gain)
