"""Prefix-tuning training for prefix-serve: data loading, the training loop, evaluation and example tasks.

Needs the `train` extra (peft, tqdm). Nothing here is imported by the server itself.

The prompt contract shared by training, evaluation and serving: the prompt is tokenized exactly as `POST /generate`
tokenizes `inputs` (the tokenizer's own special tokens, no chat template), the model learns to continue it with the
completion and then its end-of-sequence token. So a client sends the same prompt text the prefix was trained on.
"""
