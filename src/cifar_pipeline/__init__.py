"""A reproducible CIFAR-10 training pipeline on DVC: the code the stage scripts in stages/ share."""
