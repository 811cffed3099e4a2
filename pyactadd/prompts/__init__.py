"""Stage 1, prompts: text to the token ids llama.cpp will see (tokenizer, anchors, chat
templates, prompt and pair files)."""
