#!/usr/bin/env python3
"""Loads a LoRA adapter exported by `tuneforge export --peft` with Hugging Face PEFT on top of
the base BertModel and prints, for each text, the class probabilities of tuneforge's head
(mean pooling over real tokens, then `classifier_head.safetensors`), as JSON.

usage: peft_check.py BASE_MODEL_DIR PEFT_DIR TEXT...
It installs nothing; `cargo xtask bench peft` runs it in the bench's virtual environment.
"""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer


def main():
    base_dir, peft_dir, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
    meta = json.load(open(f"{peft_dir}/tuneforge.json"))
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.backend_tokenizer.no_padding()
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), peft_dir)
    model.eval()
    head = load_file(f"{peft_dir}/classifier_head.safetensors")
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok([text], truncation=True, max_length=meta["max_len"], return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)
            logits = pooled @ head["classifier.weight"].T + head["classifier.bias"]
            probs = torch.softmax(logits, -1)[0].tolist()
            out.append(dict(zip(meta["labels"], probs)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
