"""The lr-find and train stages: the loader, the runtime (device, precision, processes), the training engine, the LR
range test, the training loop and its resume state."""
