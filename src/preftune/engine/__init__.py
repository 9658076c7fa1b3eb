"""The log-probability engine: batch layouts, attention over them, the chunked LM head, reference log-probs;
the model kinds (``engine/kinds/``) are its only seam with a model."""
