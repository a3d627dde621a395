"""One forward and backward of a UNet with a LoRA in training mode (dropout 0.3, B non-zero), dropout masks
kept as a checkpointed CUDA-graph step keeps them: the output and every LoRA gradient, for comparing paths
(tests/test_lora_linear_fn.py, and tests/test_dropout_down.py under Triton's interpreter)."""
import torch

from lora import mask_replay
from lora.inject import inject_lora, lora_parameters, set_fused_lora_backward


def unet_lora_grads(unet, targets, fused: bool, ckpt: bool):
    torch.manual_seed(1)
    inject_lora(unet, targets, rank=4, alpha=4, dropout=0.3)
    for n, p in unet.named_parameters():
        if "lora.default.up" in n:
            p.data.normal_(0, 0.1)
    set_fused_lora_backward(unet, fused)
    unet.train()
    if ckpt:
        unet.set_gradient_checkpointing(True, preserve_rng_state=False, context_fn=mask_replay.context_fn)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    torch.manual_seed(2)
    mask_replay.clear()
    with mask_replay.recording():
        out = unet(x, torch.tensor([10, 500]), ctx)
    out.square().mean().backward()
    mask_replay.clear()
    return out.detach(), [p.grad.clone() for p in lora_parameters(unet)]
