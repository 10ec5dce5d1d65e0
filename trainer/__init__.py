"""Pure PyTorch: runs in one process with no Ray and no MLflow imported.

Floors, each importing only from those below it (tests/test_package.py):
utils (errors, paths, digests, collectives) < config < data (corpora, windows, masking, task
sampling, scoring) < modules (the model, losses, the kept frozen bottom, the batched pieces) <
training (optimisers, the meta-training engine and loop, fine-tuning, adaptation, prediction,
checkpoints, and the per-task reference that the engine is tested against).
"""
