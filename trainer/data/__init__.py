"""Text to tensors and back: corpora, label windows, entity masking, which pseudo tasks each
meta-step draws, and phrase-level scoring."""
