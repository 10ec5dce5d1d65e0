"""What changes weights, and what reads them back: optimisers, the vectorised meta-training
engine and its loop, plain fine-tuning, test-time adaptation, prediction, checkpoints, and the
per-task first-order MAML reference the engine is tested against."""
