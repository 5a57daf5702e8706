"""Using a trained model: cifar-predict, cifar-export (ONNX) and cifar-results, the commands pyproject.toml installs."""
