"""A reproducible CIFAR-10 (or CIFAR-100, or your own image folders) training pipeline on DVC: the code the stage
scripts in stages/ share."""
