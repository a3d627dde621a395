"""The benchmarked training configurations (issue 9) and how each side spells them."""

CONFIGS = {
    # the Hieu report: batch 2, r32/a16 on the attention projections, LoRA dropout 0.1, fp16, 512x512
    "report": dict(batch=2, rank=32, alpha=16, targets=["to_q", "to_k", "to_v", "to_out.0"], precision="fp16",
                   lora_conf="attention", ckpt=False),
    # seed 000 (FFHQ faces): batch 4, r16/a32 on attention, projection and resnet convolutions
    "seed000": dict(batch=4, rank=16, alpha=32, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                          "conv1", "conv2", "conv_shortcut"],
                    precision="fp16", lora_conf="attention_proj_conv", ckpt=False),
    "seed000_ckpt": dict(batch=4, rank=16, alpha=32, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                               "proj_out", "conv1", "conv2", "conv_shortcut"],
                         precision="fp16", lora_conf="attention_proj_conv", ckpt=True),
    # batch 8 in bf16: where the GPU can be kept busy
    "b8_bf16": dict(batch=8, rank=32, alpha=16, targets=["to_q", "to_k", "to_v", "to_out.0"], precision="bf16",
                    lora_conf="attention", ckpt=False),
}
DROPOUT = 0.1
LR = 1e-4
