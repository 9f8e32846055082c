#!/usr/bin/env python3
"""The PyTorch side of `cargo xtask bench train --with-pytorch`.

Runs one workload on all-MiniLM-L6-v2 the way tuneforge's bench does, and prints one JSON
object: tokenizer padding off and each batch padded to its longest row; batches of 32 rows
in file order; real (non-pad) tokens counted, [CLS]/[SEP] included; WARMUP + STEPS steps of
forward + cross entropy + backward + AdamW (lr 5e-5, weight decay 0.01) + zero_grad with
dropout on; inference in eval mode under no_grad. The classifier is the same as
tuneforge's: mean pooling over real tokens, dropout 0.1, a linear head.

usage: pytorch_bench.py MODEL_DIR DATA_CSV WORKLOAD STEPS WARMUP
workloads: full, freeze-last-2, lora-r8, inference, inference-batch1
It installs nothing; xtask makes the virtual environment.
"""
import csv
import json
import resource
import sys
import time

import torch
from transformers import AutoModel, AutoTokenizer


def main():
    model_dir, data, workload, steps, warmup = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    rows = list(csv.DictReader(open(data, newline="", encoding="utf-8")))
    labels = sorted({r["label"] for r in rows})
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.no_padding()
    encoder = AutoModel.from_pretrained(model_dir)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.dropout = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(encoder.config.hidden_size, len(labels))

        def forward(self, ids, mask):
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return self.head(self.dropout(pooled))

    model = Classifier()
    if workload == "freeze-last-2":
        for p in model.encoder.embeddings.parameters():
            p.requires_grad = False
        for layer in model.encoder.encoder.layer[:-2]:
            for p in layer.parameters():
                p.requires_grad = False
    elif workload == "lora-r8":
        from peft import LoraConfig, get_peft_model

        model.encoder = get_peft_model(
            encoder, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
        )
        for p in model.head.parameters():
            p.requires_grad = True

    bs = 1 if workload == "inference-batch1" else 32
    batches = []
    for b in range(warmup + steps):
        start = (b * bs) % len(rows)
        chunk = rows[start : start + bs]
        enc = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        y = torch.tensor([labels.index(r["label"]) for r in chunk])
        batches.append((enc["input_ids"], enc["attention_mask"], y))

    tokens, seconds = 0, 0.0
    if workload.startswith("inference"):
        model.eval()
        with torch.no_grad():
            for i, (ids, mask, _) in enumerate(batches):
                t = time.perf_counter()
                model(ids, mask)
                if i >= warmup:
                    seconds += time.perf_counter() - t
                    tokens += int(mask.sum())
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
        loss_fn = torch.nn.CrossEntropyLoss()
        for i, (ids, mask, y) in enumerate(batches):
            t = time.perf_counter()
            loss = loss_fn(model(ids, mask), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= warmup:
                seconds += time.perf_counter() - t
                tokens += int(mask.sum())
    print(json.dumps({
        "mode": workload,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "s_per_step": seconds / max(steps, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
