"""Models in and out: GGUF (llama.cpp) and Hugging Face folders."""
