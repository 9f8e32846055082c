#!/usr/bin/env python3
"""Loads an instruction-tuned decoder exported by tuneforge into Hugging Face transformers, two
ways: the base model with the LoRA adapter of `tuneforge export --peft` (through PEFT), and the
model directory of `tuneforge export --merged`; prints both models' logits for the token ids
given (one sequence) as JSON: {"peft": [[...], ...], "merged": [[...], ...]}.

usage: peft_lm_check.py BASE_MODEL_DIR PEFT_DIR MERGED_DIR ID...
It installs nothing; the test that calls it finds a Python with torch, transformers and peft.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].tolist()


def main():
    base_dir, peft_dir, merged_dir = sys.argv[1:4]
    ids = [int(i) for i in sys.argv[4:]]
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, peft_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32)
    print(json.dumps({"peft": logits(with_adapter, ids), "merged": logits(merged, ids)}))


if __name__ == "__main__":
    main()
