"""InternVL-Chat-V1.5 itself: its prompt, tokenizer, weight mapping and loading onto transformers' native classes."""
