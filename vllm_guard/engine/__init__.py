"""vLLM itself: the supervised child process (`launcher`), what the guard knows of its state
(`state`), and the tiny random-weight model for CPU runs (`tiny_model`)."""
