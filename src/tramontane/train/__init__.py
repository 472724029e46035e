"""Fine-tuning: training data (mistral-finetune's JSONL formats, loss masks, packing) and the training loop."""
