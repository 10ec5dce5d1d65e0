"""The network: the encoder with its token classifier, the losses, the frozen bottom kept once
and shared, and the batched top that meta-training and adaptation both run."""
