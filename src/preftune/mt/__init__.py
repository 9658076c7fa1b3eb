"""The ALMA-R machine-translation workflow: prompts, readers, triplets, scorers, translation, evaluation."""
