#!/usr/bin/env python3
"""The PyTorch reference for `cargo xtask gpu-check`: the same workloads as tuneforge's
gpu-bench example, on the same GPU, printed as the same JSON fields.

  minilm:  a BertModel with all-MiniLM-L6-v2's shape (random weights), mean pooling, dropout
           0.1, a 20-label head; full fine-tuning, AdamW (lr 5e-5, wd 0.01), clipping at 1.
  bert-base: the same with BERT-base's shape (12 layers, hidden 768).
  smollm2: a LlamaForCausalLM with SmolLM2-135M's shape (random weights, tied embeddings),
           LoRA r=8 alpha=16 dropout 0.05 on every projection (Hugging Face PEFT), AdamW.
bf16 is torch.autocast(bfloat16) over f32 master weights, as tuneforge's mixed precision;
attention is PyTorch's default (sdpa). Installs nothing.

usage: pytorch_gpu_bench.py MODEL PRECISION BATCH SEQ STEPS [--checkpointing]
"""
import json
import sys
import time

import torch


def main():
    model, precision, batch, seq, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ckpt = "--checkpointing" in sys.argv
    warmup = 3
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if model in ("minilm", "bert-base"):
        from transformers import BertConfig, BertModel

        h, layers, inter = (384.0, 6.0, 1536.0) if model == "minilm" else (768.0, 12.0, 3072.0)
        cfg = BertConfig(vocab_size=30522, hidden_size=int(h), num_hidden_layers=int(layers), num_attention_heads=12,
                         intermediate_size=int(inter), max_position_embeddings=512)
        encoder = BertModel(cfg, add_pooling_layer=False)
        if ckpt:
            encoder.gradient_checkpointing_enable()

        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = encoder
                self.dropout = torch.nn.Dropout(0.1)
                self.head = torch.nn.Linear(int(h), 20)

            def forward(self, ids, mask, labels):
                h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1)
                return torch.nn.functional.cross_entropy(self.head(self.dropout(pooled)).float(), labels)

        net = Classifier().to(dev).train()
        ids = torch.randint(1, 30522, (batch, seq), device=dev)
        mask = torch.ones_like(ids)
        labels = torch.arange(batch, device=dev) % 20
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
        loss_fn = lambda: net(ids, mask, labels)
        dense = layers * (4 * h * h + 2 * h * inter)
        flops = batch * seq * (6 * dense + 12 * layers * seq * h)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                          max_position_embeddings=8192, tie_word_embeddings=True)
        base = LlamaForCausalLM(cfg)
        if ckpt:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        net = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).to(dev).train()
        ids = torch.randint(1, 49152, (batch, seq), device=dev)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
        loss_fn = lambda: net(input_ids=ids, labels=ids).loss
        h, layers, inter, kv = 576.0, 30.0, 1536.0, 192.0
        base_flops = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * 49152
        flops = batch * seq * (4 * base_flops + 12 * layers * seq * h)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    base_reserved = torch.cuda.memory_reserved()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    secs = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() - base_mem
    reserved = torch.cuda.max_memory_reserved() - base_reserved
    tflops = flops / secs / 1e12
    print(json.dumps({
        "model": model, "framework": "pytorch " + torch.__version__, "precision": precision,
        "checkpointing": ckpt, "batch": batch, "seq": seq, "step_ms": secs * 1e3,
        "tokens_per_s": batch * seq / secs, "tflops": tflops, "mfu": tflops / 989.0,
        "peak_memory_mib": peak / 2**20, "peak_reserved_mib": reserved / 2**20,
    }))


if __name__ == "__main__":
    main()
