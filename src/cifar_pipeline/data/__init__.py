"""The data stages: download (archive -> data/cifar10) and compute-mean-std (data/stats.json), and how later stages read
the dataset."""
