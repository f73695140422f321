"""nanolisa: memory-efficient fine-tuning of Llama-family and GPT-2 models with LISA, LoRA or full
fine-tuning, in pure PyTorch."""
from nanolisa.errors import UserError
