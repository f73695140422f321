"""nanolisa: memory-efficient fine-tuning of Llama-family and GPT-2 models with LISA, LoRA or full
fine-tuning, in pure PyTorch.

    import nanolisa
    model, tokenizer = nanolisa.load_pretrained("path/to/hf-model")   # or the built-in preset "tiny"
    logits = model(input_ids)                                          # (B, T, vocab)
    nanolisa.save_pretrained(model, tokenizer, "out/")                 # loads in transformers as-is
"""
from nanolisa.pretrained import load_model, load_pretrained, save_pretrained
from nanolisa.config import ModelConfig
from nanolisa.errors import UserError
from nanolisa.model import build_model

__all__ = ["load_pretrained", "save_pretrained", "load_model", "build_model", "ModelConfig", "UserError"]
