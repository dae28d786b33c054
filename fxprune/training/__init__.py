"""Above the compiler core: fine-tuning, BN recalibration, CIFAR-10 data and the CIFAR ResNet family.
`import fxprune` does not import this package; `fxprune.finetune` and friends load it on first use."""
